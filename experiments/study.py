"""The pieces of a TPS-vs-pruning study: evaluate reductions, fine-tune, tabulate, plot.

  cfg = fashion_mnist_config()                          # the dense teacher's config
  params = load_dense(cfg, "results/fmnist_teacher/params.npz")
  point = evaluate_reduction(cfg, params, reduction("etps", keep=0.5, locations=...))
  summary = train(config_arg, workdir)                  # train.py in a subprocess, resumable
  plot_curves(points, "curves.png", title=...)

Everything here drives the library (`tps_jax.trainer.loop`); nothing here is
specific to one dataset except `fashion_mnist_config`.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
import textwrap
import time
from typing import Any, Iterable, Sequence

import jax
import numpy as np

from configs import common as config_common
from configs import fashion_mnist as fmnist_config
from tps_jax import atomic, checkpoints, data
from tps_jax import methods as registry
from tps_jax.models.vit import build_model as _build_model
from tps_jax.trainer import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
TEACHER = RESULTS / "fmnist_teacher" / "params.npz"
TEACHER_COMMAND = "python -m experiments.fashion_mnist teacher"
# One style per method, the same in every plot.
STYLE = {
    "none": dict(color="black", marker="*", label="dense"),
    "dtps": dict(color="tab:red", marker="o", label="dTPS (squeeze)"),
    "dynamicvit": dict(color="tab:blue", marker="s", label="DynamicViT (drop)"),
    "etps": dict(color="tab:orange", marker="o", label="eTPS (squeeze)"),
    "evit": dict(color="tab:green", marker="s", label="EViT (fuse)"),
    "topk": dict(color="tab:purple", marker="v", label="top-k (drop)"),
    "tome": dict(color="tab:gray", marker="D", label="ToMe (merge)"),
    "pitome": dict(color="tab:brown", marker="P", label="PiToMe (merge)"),
    "mctf": dict(color="tab:olive", marker="X", label="MCTF (fuse)"),
    "tofu": dict(color="tab:pink", marker="h", label="ToFu (prune, then MLERP)"),
    "diffrate": dict(color="tab:cyan", marker="*", label="DiffRate (searched schedule)"),
}


def fashion_mnist_config(*args: str):
  """configs/fashion_mnist.py with the arguments joined ("method=etps", "keep=0.5", ...)."""
  return fmnist_config.get_config(join_args(*args) or None)


def join_args(*parts: str) -> str:
  """Config arguments -> "a=1,b=2" (empty parts left out)."""
  return ",".join(p for p in parts if p)


def relative(path: str | os.PathLike) -> str:
  """`path` relative to the checkout where it lies inside it (for picture titles)."""
  path = pathlib.Path(path).resolve()
  return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def stage_locations(arg: str = "") -> tuple[int, ...]:
  """The stage blocks configs/fashion_mnist.py:`arg` uses for every staged method."""
  probe = fashion_mnist_config(arg, "method=topk")
  return tuple(probe.model.reduction["locations"])


@functools.lru_cache(maxsize=None)
def _dataset_classes(dataset: str, data_dir: str | None) -> int:
  return data.get_source(dataset, data_dir=data_dir).num_classes


def build_model(config, **overrides):
  """The inference model of `config` (classes from the config or else from its dataset)."""
  num_classes = config.get("num_classes") or _dataset_classes(config.input.dataset,
                                                              config.input.get("data_dir"))
  return _build_model(config.model, num_classes, **overrides)


def load_dense(config, checkpoint: str | os.PathLike):
  """Parameters of the dense model of `config` from `checkpoint` (host arrays)."""
  path = pathlib.Path(checkpoint)
  if not path.exists():
    raise FileNotFoundError(f"teacher checkpoint {path} does not exist; train it with\n  "
                            f"{TEACHER_COMMAND}")
  return checkpoints.load_params(path, build_model(config, reduction=None))


def normalise(images_uint8, config):
  """(B, H, W) or (B, H, W, C) uint8 -> the model's float input and the [0, 1] picture."""
  raw = images_uint8.astype("float32") / 255.0
  raw = raw[..., None] if raw.ndim == 3 else raw
  pre = config.input.preprocess
  return (raw - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32), raw


def evaluate_reduction(config, params, reduction: dict | None, *,
                       speed_repeats: int = 3) -> dict[str, Any]:
  """Top-1 (whole eval split), MACs and inference images/s of `params` run with `reduction`.

  `params` must fit the reduced model (dense parameters do for every training-free
  method: etps, evit, topk, tome, none).
  """
  cfg = config.copy_and_resolve_references()
  cfg.model.reduction = reduction
  run = loop.Run(cfg)
  placed = jax.device_put(params, run.state_shardings["params"])
  run.compile_eval()
  result = run.summary(placed, speed_repeats=speed_repeats)
  if reduction and "keep_ratio" in reduction:
    result["keep"] = reduction["keep_ratio"]
  return result


def sweeps_r(method: str) -> bool:
  """Whether a method's recipe is set by r (tokens merged per block) rather than a keep ratio:
  read from what its `Method.spec` takes."""
  spec = registry.get(method).spec
  if not config_common.takes_knobs(method):
    return False
  try:
    return spec(keep_ratio=1.0, r=1) != spec(keep_ratio=1.0, r=2)
  except ValueError:
    return False


def offshelf_sweep(config, params, *, locations: Sequence[int], methods: Sequence[str],
                   keeps: Sequence[float], rs: Sequence[int], score: str = "auto",
                   log=print) -> list[dict[str, Any]]:
  """Training-free methods on the same parameters: one point per (method, keep) or ToMe r,
  plus the dense model first."""
  points = []
  by_r = [m for m in methods if sweeps_r(m)]  # swept over r, the tokens merged per block
  fixed = [m for m in methods if not config_common.takes_knobs(m)]  # one point: its example
  todo = [("none", None)] + [(m, k) for m in methods if m not in by_r + fixed for k in keeps]
  todo += [(m, r) for m in by_r for r in rs] + [(m, None) for m in fixed]
  for method, arg in todo:
    if method == "none":
      red = None
    elif method in fixed:
      red = config_common.reduction(method, 0.0, model=config.model)
    elif method in by_r:  # ToMe in every block, MCTF in blocks 1.. (the authors')
      red = config_common.reduction(method, 0.0, r=arg)
    else:
      red = config_common.reduction(method, arg, locations, score=score)
    t = time.perf_counter()
    p = evaluate_reduction(config, params, red)
    points.append(p)
    what = f"r={arg}" if method in by_r else (f"keep={arg}" if arg else "")
    log(f"  {method:6s} {what:9s} top-1 {100 * p['top1']:6.2f}%  {p['gmacs'] * 1e3:7.2f} MMACs"
        f"  {p['images_per_s']:7.0f} img/s  ({time.perf_counter() - t:.0f}s)")
  return points


def train(arg: str, workdir: str | os.PathLike, *, config: str = "configs/fashion_mnist.py",
          overrides: Iterable[str] = (), log=print) -> dict[str, Any]:
  """Runs train.py for `config:arg` in a subprocess into `workdir`; returns its summary.

  A workdir that already holds a summary is not run again; one with
  checkpoints resumes. The subprocess's output goes to `<workdir>.log`.
  """
  workdir = pathlib.Path(workdir)
  done = workdir / "summary.json"
  if done.exists():
    return json.loads(done.read_text())
  workdir.parent.mkdir(parents=True, exist_ok=True)
  cmd = [sys.executable, str(ROOT / "train.py"), f"--config={ROOT / config}:{arg}",
         f"--workdir={workdir}", *overrides]
  log(f"  $ {' '.join(cmd[1:])}")
  log_path = workdir.parent / f"{workdir.name}.log"  # not with_suffix: names hold dots (0.7)
  t = time.perf_counter()
  with open(log_path, "a") as f:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
  if proc.returncode == 0 and not done.exists():
    raise RuntimeError(f"training {arg!r} stopped before its last step (by a signal); its "
                       f"checkpoint is in {workdir}: rerun to resume. Log: {log_path}")
  if proc.returncode != 0 or not done.exists():
    raise RuntimeError(f"training {arg!r} failed (exit {proc.returncode}); see "
                       f"{log_path}")
  summary = json.loads(done.read_text())
  log(f"    top-1 {100 * summary['top1']:.2f}%  ({time.perf_counter() - t:.0f}s)")
  return summary


def aggregate(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Runs of several seeds -> one row per (method, keep): mean, spread, per-seed top-1."""
  groups: dict[tuple, list] = {}
  for r in runs:
    groups.setdefault((r["method"], r["keep"]), []).append(r)
  rows = []
  for (method, keep), rs in sorted(groups.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
    top1 = [r["top1"] for r in rs]
    rows.append({"method": method, "keep": keep, "seeds": len(rs),
                 "top1_mean": statistics.fmean(top1),
                 "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
                 "top1_min": min(top1), "top1_max": max(top1), "top1_runs": top1,
                 "gmacs": rs[0]["gmacs"],
                 "images_per_s": statistics.fmean(r["images_per_s"] for r in rs)})
  return rows


def plot_curves(points: Sequence[dict[str, Any]], path: str | os.PathLike, *, title: str,
                dense: dict[str, Any] | None = None, error_key: str | None = None,
                y_key: str = "top1", pairs: Sequence[tuple[str, str]] = ()):
  """Top-1 (%) vs MMACs, one line per method; error bars from `error_key` if given.

  `pairs` (a, b): draw the methods side by side in subplots, one per pair.
  """
  import matplotlib
  matplotlib.use("Agg", force=False)
  import matplotlib.pyplot as plt

  groups = [tuple(p) for p in pairs] or [tuple(dict.fromkeys(p["method"] for p in points))]
  fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4), squeeze=False)
  for ax, group in zip(axes[0], groups):
    for method in group:
      pts = sorted((p for p in points if p["method"] == method), key=lambda p: p["gmacs"])
      if not pts:
        continue
      x = [p["gmacs"] * 1e3 for p in pts]
      y = [100 * p[y_key] for p in pts]
      err = [100 * p[error_key] for p in pts] if error_key else None
      style = STYLE.get(method, dict(label=method))
      ax.errorbar(x, y, yerr=err, capsize=3, lw=1.5, ms=5, **style)
    if dense:
      ax.axhline(100 * dense["top1"], color="black", ls="--", lw=0.8)
      ax.plot([dense["gmacs"] * 1e3], [100 * dense["top1"]], **STYLE["none"], ls="none", ms=10)
    ax.set_xlabel("MMACs per image")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
  # Wrapped to the figure's width (about 13 characters an inch at 10 pt), and room kept above
  # the axes for its lines, so a long title is never clipped.
  lines = textwrap.wrap(title, width=max(30, int(13 * fig.get_figwidth())))
  fig.suptitle("\n".join(lines), fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.045 * len(lines)))
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
  """Writes `payload` plus the machine it ran on, atomically."""
  from benchmarks.common import machine  # pylint: disable=g-import-not-at-top
  return atomic.write_json(path, {"machine": machine(), **payload})
