"""Does TPS beat pruning when pruning gets aggressive? The Fashion-MNIST study.

  python -m experiments.fashion_mnist quick       # the README's main job (the committed models)
  python -m experiments.fashion_mnist teacher     # the dense teacher (about 2 h 50 min, 2 cores)
  python -m experiments.fashion_mnist offshelf    # training-free eTPS / EViT / top-k / ToMe
  python -m experiments.fashion_mnist scores      # which cls-free score a stage should use
  python -m experiments.fashion_mnist curve       # how long the learned scorers need
  python -m experiments.fashion_mnist finetune    # dTPS vs DynamicViT, eTPS vs EViT, seeds
  python -m experiments.fashion_mnist pictures    # kept / pruned / host pictures per stage
  python -m experiments.fashion_mnist report      # markdown tables of the results (README)

Every step reads the committed teacher (results/fmnist_teacher/params.npz) and
writes JSON and PNG under results/ (quick: under --out). Fine-tuning runs
live in --workdir/<method>_<keep>_s<seed> (the committed study: runs/ft500): a
run that finished is not redone and one that was killed resumes, so `finetune`
can be rerun until it is complete; `finetune --report --publish` writes the
study from the finished runs and copies the seed-0 models the main job
evaluates into results/fmnist_finetuned/.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import study  # noqa: E402
from tps_jax import atomic  # noqa: E402
from tps_jax import methods as registry  # noqa: E402
from tps_jax.methods import scored  # noqa: E402

KEEPS = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
# The default sweep: keep ratios or r. PiToMe (a per-block ratio in [0.5, 1]) and DiffRate (a
# searched schedule: `search`) run by their own commands (docs/results.md).
OFFSHELF_METHODS = ("etps", "evit", "topk", "tome", "mctf", "tofu")
R_SWEEP = (1, 2, 3, 4, 5)
# Each TPS variant and its pruning baseline: squeezing against dropping (dTPS, DynamicViT) and
# against fusing (eTPS, EViT).
FINETUNE_PAIRS = (("dtps", "dynamicvit"), ("etps", "evit"))
FINETUNE_METHODS = tuple(m for pair in FINETUNE_PAIRS for m in pair)  # dtps, dynamicvit, ...


def _floats(s: str) -> tuple[float, ...]:
  return tuple(float(v) for v in s.split(",") if v)


def _ints(s: str) -> tuple[int, ...]:
  return tuple(int(v) for v in s.split(",") if v)


def _methods(s: str) -> tuple[str, ...]:
  """Comma-separated methods: registered names or module paths (my_pkg.my_method, mine.py),
  each checked (and a module imported) here, so a bad one fails before anything runs."""
  methods = tuple(v for v in s.split(",") if v)
  for m in methods:
    try:
      registry.get(m)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return methods


# The teacher's schedule: 12 epochs from scratch (lr 2e-3), then two warm-started cosine cycles of
# 8 epochs each (lr 1e-3, then 5e-4), each starting from the previous phase's parameters.
TEACHER_PHASES = (("fmnist_teacher", ""), ("fmnist_teacher_b", "lr=1e-3"),
                  ("fmnist_teacher_c", "lr=5e-4"))


def teacher(args) -> None:
  """Trains the teacher's phases in turn (each resumes or is skipped); copies the best to results/."""
  runs = study.ROOT / "runs"
  summaries, previous = {}, None
  for name, extra in TEACHER_PHASES[:args.phases]:
    name += args.suffix
    start = f"warm_start={runs / previous / 'params.npz'}" if previous else ""
    summaries[name] = study.train(study.join_args(args.arg, start, extra), runs / name)
    print(f"phase {name}: top-1 {100 * summaries[name]['top1']:.2f}%")
    previous = name
  best = max(summaries, key=lambda n: summaries[n]["top1"])
  dest = pathlib.Path(args.teacher).parent
  dest.mkdir(parents=True, exist_ok=True)
  for name in ("params.npz", "summary.json", "config.json"):
    shutil.copy(runs / best / name, dest / name)
  atomic.write_json(dest / "phases.json", summaries)
  print(f"teacher: {best}, top-1 {100 * summaries[best]['top1']:.2f}% -> {dest}")


def offshelf(args) -> None:
  cfg = study.fashion_mnist_config(args.arg)
  params = study.load_dense(cfg, args.teacher)
  print(f"training-free methods on {args.teacher}:")
  points = study.offshelf_sweep(cfg, params, locations=study.stage_locations(args.arg),
                                methods=args.methods, keeps=args.keeps, rs=args.rs,
                                score=args.score)
  dense = points[0]
  out = pathlib.Path(args.results)
  name = args.name
  study.write_json(out / f"{name}.json", {
      "what": "training-free token reduction on the dense Fashion-MNIST teacher, whole test set",
      "teacher": str(args.teacher), "config_arg": args.arg, "score": args.score,
      "locations": list(study.stage_locations(args.arg)), "dense": dense, "points": points[1:]})
  png = study.plot_curves(points[1:], out / f"{name}.png", dense=dense,
                          title=f"Fashion-MNIST{' (' + args.arg + ')' if args.arg else ''}, off "
                                f"the shelf (no fine-tuning): top-1 vs MACs")
  print(f"wrote {out / (name + '.json')} and {png}")


def score_table(runs: dict[str, list[dict]]) -> dict:
  """{score: offshelf points} -> per (method, keep) the top-1 of each score, the best score and
  its margin over the next; and the score with the best mean top-1 over every point."""
  scores = list(runs)
  keyed = {sc: {(p["method"], p["keep"]): p["top1"] for p in pts} for sc, pts in runs.items()}
  rows = []
  for method, keep in keyed[scores[0]]:
    top1 = {sc: keyed[sc][(method, keep)] for sc in scores}
    ranked = sorted(scores, key=top1.get, reverse=True)
    rows.append({"method": method, "keep": keep, "top1": top1, "best": ranked[0],
                 "margin": top1[ranked[0]] - top1[ranked[1]] if len(ranked) > 1 else 0.0})
  mean = {sc: sum(keyed[sc].values()) / len(keyed[sc]) for sc in scores}
  return {"rows": rows, "mean_top1": mean, "winner": max(scores, key=mean.get)}


def scores(args) -> None:
  """The training-free attention stages (etps, topk) under each cls-free score on one teacher,
  and which score wins (`score="auto"` takes scored.MAP_SCORE on MAP models, else
  scored.CLS_FREE_SCORE)."""
  cfg = study.fashion_mnist_config(args.arg)
  params = study.load_dense(cfg, args.teacher)
  locations = study.stage_locations(args.arg)
  runs, dense = {}, None
  for score in args.scores:
    print(f"score {score}:")
    points = study.offshelf_sweep(cfg, params, locations=locations, methods=args.methods,
                                  keeps=args.keeps, rs=(), score=score)
    dense, runs[score] = points[0], points[1:]
  table = score_table(runs)
  map_model = "pool=map" in args.arg
  out = pathlib.Path(args.results) / f"{args.name}.json"
  study.write_json(out, {
      "what": "cls-free attention scores of the training-free stages, on the dense "
              "Fashion-MNIST teacher, whole test set", "teacher": str(args.teacher),
      "config_arg": args.arg, "locations": list(locations), "dense": dense, **table,
      "auto_takes": scored.MAP_SCORE if map_model else scored.CLS_FREE_SCORE, "points": runs})
  print(f"{'method':6s} {'keep':>4s}  " + "  ".join(f"{s:>10s}" for s in runs) + "  best")
  for r in table["rows"]:
    print(f"{r['method']:6s} {r['keep']:4.1f}  " +
          "  ".join(f"{100 * r['top1'][s]:9.2f}%" for s in runs) +
          f"  {r['best']} (+{100 * r['margin']:.2f})")
  print(f"winner by mean top-1: {table['winner']}; wrote {out}")


def finetune(args) -> None:
  """Fine-tunes each (seed, keep, method) from the teacher (resuming, skipping finished runs);
  writes the study's JSON and plot after every run, so a stopped study keeps what it has."""
  teacher_path = pathlib.Path(args.teacher).resolve()
  todo = [(seed, keep, method) for seed in args.seeds  # seed-major: one full comparison
          for keep in args.keeps for method in args.methods]  # lands before the next seed
  runs = []
  for seed, keep, method in todo:
    name = f"{method}_{keep}_s{seed}"
    workdir = pathlib.Path(args.workdir) / name
    if args.report:  # what has finished, without training
      done = workdir / "summary.json"
      if not done.exists():
        continue
      s = json.loads(done.read_text())
    else:
      arg = study.join_args(args.arg, f"method={method}", f"keep={keep}",
                            f"init={teacher_path}", f"seed={seed}", f"steps={args.steps}")
      print(f"fine-tune {name}:")
      s = study.train(arg, workdir, overrides=["--config.tensorboard=False"])
    runs.append({**s, "keep": keep, "seed": seed, "steps": args.steps, "workdir": name})
    _write_finetune(args, teacher_path, runs, complete=len(runs) == len(todo))
  if args.publish:
    _publish(args, runs)


def _write_finetune(args, teacher_path: pathlib.Path, runs, *, complete: bool) -> None:
  rows = study.aggregate(runs)
  cfg = study.fashion_mnist_config(args.arg)
  dense = json.loads((teacher_path.parent / "summary.json").read_text()) \
      if (teacher_path.parent / "summary.json").exists() else None
  out = pathlib.Path(args.results)
  seeds = sorted({r["seed"] for r in runs})
  study.write_json(out / "fmnist_finetune.json", {
      "what": f"fine-tuned {args.steps} steps of batch {cfg.input.batch_size} from the teacher "
              "with docs/method.md section 9's losses, the same schedule for every method; whole test set",
      "complete": complete, "teacher": study.relative(args.teacher), "dense": dense,
      "rows": rows, "runs": runs})
  study.plot_curves(rows, out / "fmnist_finetune.png", dense=dense, y_key="top1_mean",
                    error_key="top1_std", pairs=FINETUNE_PAIRS,
                    title=f"Fashion-MNIST, fine-tuned {args.steps} steps: mean top-1 "
                          f"± std over seeds {seeds} vs MACs")
  _print_rows(rows)
  print(f"wrote {out / 'fmnist_finetune.json'} ({len(runs)} runs"
        f"{'' if complete else ', study not complete'})")


def _publish(args, runs) -> None:
  """Copies the seed-0 models at `--publish_keep` into results/fmnist_finetuned/ (the main
  job's models): params, config and summary. A run whose parameters are not here (carried
  from another machine without them, benchmarks/gpu/carry_runs.sh) is named and skipped."""
  dest_root = pathlib.Path(args.results) / "fmnist_finetuned"
  for r in runs:
    if r["seed"] != 0 or r["keep"] != args.publish_keep:
      continue
    src = pathlib.Path(args.workdir) / r["workdir"]
    if not (src / "params.npz").exists():
      print(f"not published: {src} has no params.npz here (the machine that trained it "
            f"publishes it)")
      continue
    dest = dest_root / f"{r['method']}_{r['keep']}"
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.npz", "config.json", "summary.json"):
      shutil.copy(src / name, dest / name)
    print(f"published {src} -> {dest}")


def read_evals(workdir: pathlib.Path) -> dict[int, float]:
  """Step -> test top-1 of a run's evaluations (metrics.jsonl; a resumed step keeps its last)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  evals = {}
  if path.exists():
    for line in path.read_text().splitlines():
      r = json.loads(line)
      if r.get("kind") in ("eval", "final") and "top1" in r:
        evals[int(r["step"])] = float(r["top1"])
  return dict(sorted(evals.items()))


def curve(args) -> None:
  """One long fine-tune per learned method with test top-1 at several steps: how many steps
  does a scorer need? (the study's fine-tuning length is picked from this curve)."""
  teacher_path = pathlib.Path(args.teacher).resolve()
  steps = max(args.at)
  curves = []
  for method in args.methods:
    name = f"{method}_{args.keep}_s{args.seed}_{steps}"
    arg = study.join_args(args.arg, f"method={method}", f"keep={args.keep}",
                          f"init={teacher_path}", f"seed={args.seed}", f"steps={steps}")
    workdir = pathlib.Path(args.workdir) / name
    if args.report:  # what the runs have evaluated so far, without training
      summary = workdir / "summary.json"
      s = json.loads(summary.read_text()) if summary.exists() else {}
    else:
      print(f"fine-tune {name} (evaluations at {list(args.at)}):")
      s = study.train(arg, workdir, overrides=[
          "--config.tensorboard=False",
          f"--config.eval_at_steps=({','.join(str(a) for a in args.at if a != steps)},)"])
    curves.append({"method": method, "keep": args.keep, "seed": args.seed, "steps": steps,
                   "complete": bool(s), "gmacs": s.get("gmacs"),
                   "top1_at": {str(k): v for k, v in read_evals(workdir).items()},
                   "workdir": name})
  out = pathlib.Path(args.results)
  study.write_json(out / "fmnist_curve.json", {
      "what": "test top-1 (all 10 000 images) during one cosine fine-tune per method from the "
              "teacher; each run's schedule is its full length (warm-up then cosine to "
              f"{steps} steps); a run not complete lists the evaluations it has reached",
      "teacher": str(args.teacher), "curves": curves})
  for c in curves:
    print(f"{c['method']:10s} " + "  ".join(f"{k}: {100 * v:.2f}" for k, v in c["top1_at"].items()))
  print(f"wrote {out / 'fmnist_curve.json'}")


def _print_rows(rows) -> None:
  from benchmarks.common import print_table  # pylint: disable=g-import-not-at-top
  table = [{"method": r["method"], "keep": r["keep"], "seeds": r["seeds"],
            "top-1 %": f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}",
            "MMACs": f"{1e3 * r['gmacs']:.2f}", "img/s": f"{r['images_per_s']:.0f}"}
           for r in rows]
  print_table(table, ["method", "keep", "seeds", "top-1 %", "MMACs", "img/s"])


def pictures(args) -> None:
  from tps_jax import visualize  # pylint: disable=g-import-not-at-top
  from tps_jax.data import fashion_mnist as fm  # pylint: disable=g-import-not-at-top
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top

  images, _ = fm.load("test")
  x, raw = study.normalise(images[list(args.images)], study.fashion_mnist_config(args.arg))
  out = pathlib.Path(args.results)
  for method in args.methods:
    model = study.build_model(study.fashion_mnist_config(args.arg, f"method={method}",
                                                         f"keep={args.keep}"))
    source = args.teacher
    if registry.get(method).learned:  # needs its fine-tuned score heads
      source = FINETUNED / f"{method}_{args.keep}" / "params.npz"
    params = checkpoints.load_params(source, model)
    path = out / f"fmnist_tokens_{method}.png"
    visualize.token_pictures(model, params, x, path, display_images=raw,
                             title=f"{method}, keep {args.keep} ({study.relative(source)})")
    print(f"wrote {path}")


MARKER = ".tps_jax_quick"  # marks a folder this job wrote, which it may replace


def fresh_out(out: pathlib.Path, overwrite: bool = False) -> pathlib.Path:
  """An empty `out` for a new run: replaces a folder this job wrote, never a user's folder."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    if not (overwrite or (out / MARKER).exists()):
      raise SystemExit(f"--out {out} exists and was not written by this job; give a new or "
                       f"empty folder, or add --overwrite to delete it.")
    shutil.rmtree(out) if out.is_dir() else out.unlink()
  out.mkdir(parents=True, exist_ok=True)
  (out / MARKER).touch()
  return out


FINETUNED = study.RESULTS / "fmnist_finetuned"  # <method>_<keep>/: params.npz, config, summary
STUDY_JSON = study.RESULTS / "fmnist_finetune.json"


def _r_like(cfg, macs: float, locations) -> int:
  """ToMe's per-block r whose MACs come closest to `macs` (training-free, matched cost)."""
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  best = None
  for r in range(1, 16):
    try:
      model = study.build_model(cfg, reduction=study.config_common.reduction("tome", 0.0,
                                                                             r=r))
    except ValueError:  # r too large for the tokens left
      break
    gap = abs(flops.macs(model) - macs)
    best = (gap, r) if best is None or gap < best[0] else best
  return best[1]


def _study_rows(path: pathlib.Path, keep: float) -> tuple[dict, str]:
  """The fine-tuning study's rows at `keep` by method, and what they are, if it exists."""
  if not path.exists():
    return {}, ""
  ft = json.loads(path.read_text())
  rows = {r["method"]: r for r in ft["rows"] if r["keep"] == keep}
  return rows, ft["what"]


def quick(args) -> None:
  """The main job: the committed fine-tuned models against the dense teacher and the
  training-free methods, on the whole test set, with the study's spread over seeds."""
  from benchmarks.common import print_table  # pylint: disable=g-import-not-at-top
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax import visualize  # pylint: disable=g-import-not-at-top
  from tps_jax.data import fashion_mnist as fm  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import loop  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  # img/s: the median of 2 timed batches of 1000 after a warm-up (the study's sweeps take 3)
  evaluate = functools.partial(study.evaluate_reduction, speed_repeats=2)
  models = pathlib.Path(args.models)
  missing = [m for m in args.methods
             if not args.finetune and not (models / f"{m}_{args.keep}" / "params.npz").exists()]
  if missing:  # said before anything runs
    raise SystemExit(f"no fine-tuned {', '.join(missing)} model in {models} "
                     f"(<method>_{args.keep}/params.npz); train the study (python -m "
                     f"experiments.fashion_mnist finetune --publish) or pass --finetune STEPS "
                     f"to fine-tune here.")
  out = fresh_out(pathlib.Path(args.out), args.overwrite)
  teacher_path = pathlib.Path(args.teacher).resolve()
  cfg = study.fashion_mnist_config(args.arg)
  params = study.load_dense(cfg, teacher_path)
  locations = study.stage_locations(args.arg)
  keep = args.keep
  spread, spread_what = _study_rows(pathlib.Path(args.study), keep)
  rows = []

  def add(label, training, r, source=""):
    s = spread.get(label) if training.startswith("fine-tuned") else None
    rows.append({"model": label, "training": training, "source": source, **r,
                 "study": s and {k: s[k] for k in ("seeds", "top1_mean", "top1_std",
                                                   "top1_runs")}})
    print(f"{label}: top-1 {100 * r['top1']:.2f}%  {1e3 * r['gmacs']:.2f} MMACs  "
          f"{r['images_per_s']:.0f} img/s   [{time.perf_counter() - start:.0f}s]")

  print(f"1/3 the dense teacher ({study.relative(teacher_path)})")
  add("dense", "teacher", evaluate(cfg, params, None))
  learned = {}
  if args.finetune:
    print(f"2/3 fine-tune {args.finetune} steps from the teacher, keep {keep}, live")
    for method in args.methods:
      fcfg = study.fashion_mnist_config(args.arg, f"method={method}", f"keep={keep}",
                                        f"init={teacher_path}", f"steps={args.finetune}")
      fcfg.tensorboard = False
      fcfg.checkpoint.every_steps = 10**9  # the final step only
      r = loop.train_and_evaluate(fcfg, out / method)
      learned[method] = out / method / "params.npz"
      add(method, f"fine-tuned {args.finetune} steps (live)", r, study.relative(learned[method]))
  else:
    print(f"2/3 the committed fine-tuned models, keep {keep} ({study.relative(models)})")
    for method in args.methods:
      folder = models / f"{method}_{keep}"
      steps = json.loads((folder / "summary.json").read_text()).get("step")
      red = study.config_common.reduction(method, keep, locations)
      model = study.build_model(study.fashion_mnist_config(args.arg, f"method={method}",
                                                           f"keep={keep}"))
      mparams = checkpoints.load_params(folder / "params.npz", model)
      learned[method] = folder / "params.npz"
      add(method, f"fine-tuned {steps} steps", evaluate(cfg, mparams, red),
          study.relative(folder / "params.npz"))
  print(f"3/3 training-free methods on the teacher, matched MACs")
  for method in ("etps", "topk"):
    red = study.config_common.reduction(method, keep, locations)
    add(method, "none (off the shelf)", evaluate(cfg, params, red))
  r = _r_like(cfg, rows[-1]["gmacs"] * 1e9, locations)
  add("tome", f"none (off the shelf, r={r})",
      evaluate(cfg, params, study.config_common.reduction("tome", 0.0, r=r)))

  dense = rows[0]
  cell = lambda s: (f"{100 * s['top1_mean']:.2f} ± {100 * s['top1_std']:.2f} (n={s['seeds']})"
                    if s else "")
  table = [{"model": r["model"], "training": r["training"], "top-1 %": f"{100 * r['top1']:.2f}",
            "study mean ± std": cell(r["study"]),
            "MMACs": f"{1e3 * r['gmacs']:.2f}",
            "MACs vs dense": f"{r['gmacs'] / dense['gmacs']:.2f}",
            "img/s": f"{r['images_per_s']:.0f}",
            "speed-up": f"{r['images_per_s'] / dense['images_per_s']:.2f}x"} for r in rows]
  print()
  print_table(table, list(table[0]))
  if spread_what:
    print(f"\nstudy: {spread_what} ({study.relative(args.study)})")
  payload = {"keep": keep, "finetune_steps": args.finetune, "teacher": str(args.teacher),
             "study": spread_what, "rows": rows, "seconds": time.perf_counter() - start}
  study.write_json(out / "quick.json", payload)
  png = study.plot_curves([{**r, "method": r["model"]} for r in rows[1:]], out / "quick.png",
                          dense=dense, title=f"Fashion-MNIST, keep {keep}: learned and "
                                             f"training-free reductions, one model each")
  first = args.methods[0]  # the first learned model's scorer, pictured (dTPS by default)
  model = study.build_model(study.fashion_mnist_config(args.arg, f"method={first}",
                                                       f"keep={keep}"))
  x, raw = study.normalise(fm.load("test")[0][:4], cfg)
  picture = out / f"tokens_{first}.png"
  visualize.token_pictures(model, checkpoints.load_params(learned[first], model),
                           x, picture, display_images=raw,
                           title=f"{study.STYLE[first]['label']}, keep {keep} "
                                 f"({rows[1]['training']})")
  print(f"wrote {out / 'quick.json'}, {png} and {picture} in {time.perf_counter() - start:.0f}s")


def _pct(v: float) -> str:
  return f"{100 * v:.2f}"


def rate_search(args) -> None:
  """DiffRate's search of per-block counts at a MACs target on the teacher, then the searched
  schedule for DiffRate itself and, as stages, for eTPS / top-k / EViT, each against the same
  method's fixed geometric schedule at the nearest MACs."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  from tps_jax.data import fashion_mnist as fm  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import rate_search as rs  # pylint: disable=g-import-not-at-top

  cfg = study.fashion_mnist_config(args.arg)
  params = study.load_dense(cfg, args.teacher)
  model = study.build_model(cfg, reduction=None)
  dense_macs = flops.macs(model)
  target = args.target * dense_macs
  images, labels = fm.load("train")
  rng = np.random.default_rng(args.seed)

  def batches():
    while True:
      idx = rng.choice(len(labels), args.batch, replace=False)
      yield study.normalise(images[idx], cfg)[0], labels[idx]

  print(f"DiffRate search at {args.target:.0%} of the dense {dense_macs / 1e6:.2f} MMACs, "
        f"{args.steps} steps of {args.batch}:")
  t = time.perf_counter()
  found = rs.search(model, params, batches(), target_macs=target, steps=args.steps,
                    lr=args.lr, lamb=args.lamb, unit=args.unit, warmup_steps=args.warmup)
  print(f"  searched in {time.perf_counter() - t:.0f}s: prune {found.prune_kept}, merge "
        f"{found.merge_kept}")
  stages = rs.to_stages(found.prune_kept, found.merge_kept, model.num_patches)
  rows = [{"method": "diffrate", "schedule": "searched", **study.evaluate_reduction(
      cfg, params, found.spec())}]
  off = json.loads((pathlib.Path(args.results) / f"{args.offshelf}.json").read_text())
  for method in args.methods:
    searched = study.evaluate_reduction(cfg, params, {"method": method, **stages})
    rows.append({"method": method, "schedule": "searched", **searched})
    fixed = min((p for p in off["points"] if p["method"] == method),  # same teacher, images
                key=lambda r: abs(r["gmacs"] - searched["gmacs"]))
    rows.append({"method": method, "schedule": f"fixed ({args.offshelf})", **fixed})
  for r in rows:
    print(f"  {r['method']:8s} {r['schedule']:8s} top-1 {100 * r['top1']:6.2f}%  "
          f"{1e3 * r['gmacs']:6.2f} MMACs  keep {r.get('keep_counts')}")
  out = pathlib.Path(args.results) / f"{args.name}.json"
  study.write_json(out, {
      "what": "DiffRate's differentiable rate search on the dense Fashion-MNIST teacher (train "
              "split), then every schedule evaluated on the whole test set",
      "teacher": study.relative(args.teacher), "target_fraction": args.target,
      "target_macs": target, "steps": args.steps, "batch": args.batch, "lr": args.lr,
      "lamb": args.lamb, "unit": args.unit, "warmup_steps": args.warmup, "seed": args.seed,
      "searched": {"prune_kept": found.prune_kept, "merge_kept": found.merge_kept,
                   "stages": stages, "proxy_macs": found.macs, "history": found.history},
      "rows": rows})
  print(f"wrote {out}")


def report(args) -> None:
  """Markdown tables of the committed results (what the README quotes)."""
  out = pathlib.Path(args.results)
  off = json.loads((out / f"{args.offshelf}.json").read_text())
  d = off["dense"]
  print(f"Dense teacher: top-1 {_pct(d['top1'])}%, {1e3 * d['gmacs']:.2f} MMACs, "
        f"{d['images_per_s']:.0f} img/s\n")
  by = {(p["method"], p.get("keep")): p for p in off["points"] if p["method"] != "tome"}
  keeps = sorted({k for _, k in by}, reverse=True)
  methods = [m for m in ("etps", "evit", "topk") if any(mm == m for mm, _ in by)]
  delta = "etps" in methods and len(methods) > 1
  print(f"| keep | patches kept per stage | {methods[0]} MMACs (% dense) | "
        + " | ".join(study.STYLE[m]["label"] for m in methods)
        + (" | eTPS - best other |" if delta else " |"))
  print("|---|---|---|" + "---|" * (len(methods) + delta))
  for k in keeps:
    row = [by[(m, k)] for m in methods if (m, k) in by]
    first = row[0]
    line = (f"| {k} | {', '.join(map(str, first['keep_counts']))} | {1e3 * first['gmacs']:.2f} "
            f"({100 * first['gmacs'] / d['gmacs']:.0f}%) | "
            + " | ".join(_pct(p["top1"]) for p in row) + " |")
    if delta:
      best_other = max(p["top1"] for p in row if p["method"] != "etps")
      line += f" {100 * (by[('etps', k)]['top1'] - best_other):+.2f} |"
    print(line)
  tome = [p for p in off["points"] if p["method"] == "tome"]
  if tome:
    print("\n| ToMe r (per block) | MMACs (% dense) | top-1 |\n|---|---|---|")
    for p in tome:
      print(f"| {p['r']} | {1e3 * p['gmacs']:.2f} ({100 * p['gmacs'] / d['gmacs']:.0f}%) "
            f"| {_pct(p['top1'])} |")
  for name in args.extra:  # more training-free methods, each against the nearest MACs
    extra = json.loads((out / f"{name}.json").read_text())
    print(f"\n{name} (each point beside the nearest-MACs eTPS and ToMe points of {args.offshelf}):"
          "\n\n| method | setting | MMACs | top-1 | eTPS (MMACs) | ToMe (MMACs) |\n"
          "|---|---|---|---|---|---|")
    near = lambda m, g: min((q for q in off["points"] if q["method"] == m),
                            key=lambda q: abs(q["gmacs"] - g), default=None)
    for p in extra["points"]:
      if p["method"] == "none":
        continue
      cells = [f"{_pct(q['top1'])} ({1e3 * q['gmacs']:.1f})" if q else "" for q in
               (near("etps", p["gmacs"]), near("tome", p["gmacs"]))]
      setting = f"keep {p['keep']}" if "keep" in p else f"r {p['r']}"
      print(f"| {p['method']} | {setting} | {1e3 * p['gmacs']:.2f} | "
            f"{_pct(p['top1'])} | {cells[0]} | {cells[1]} |")
  if args.plot:  # every training-free point on one plot: the base sweep, the extras, DiffRate
    points = [p for p in off["points"]]
    for name in args.extra:
      points += [p for p in json.loads((out / f"{name}.json").read_text())["points"]
                 if p["method"] != "none"]
    searched = out / f"{args.diffrate}.json"
    if searched.exists():
      points += [r for r in json.loads(searched.read_text())["rows"]
                 if r["method"] == "diffrate"]
    png = study.plot_curves(points, args.plot, dense=d,
                            title="Fashion-MNIST, every training-free method: top-1 vs MACs")
    print(f"\nwrote {png}")
  ft_path = out / "fmnist_finetune.json"
  if not ft_path.exists():
    return
  ft = json.loads(ft_path.read_text())
  rows = {(r["method"], r["keep"]): r for r in ft["rows"]}
  print(f"\nFine-tuned ({ft['what']}); mean ± std over seeds, [per-seed top-1]:\n")
  print("| keep | pair | MMACs | TPS | baseline | TPS - baseline | seed spread (max std) |")
  print("|---|---|---|---|---|---|---|")
  for k in sorted({k for _, k in rows}, reverse=True):
    for a, b in FINETUNE_PAIRS:
      if (a, k) not in rows or (b, k) not in rows:
        continue
      ra, rb = rows[(a, k)], rows[(b, k)]
      cell = lambda r: (f"{_pct(r['top1_mean'])} ± {_pct(r['top1_std'])} "
                        f"[{', '.join(_pct(t) for t in r['top1_runs'])}]")
      print(f"| {k} | {a} vs {b} | {1e3 * ra['gmacs']:.2f} / {1e3 * rb['gmacs']:.2f} | "
            f"{cell(ra)} | {cell(rb)} | {100 * (ra['top1_mean'] - rb['top1_mean']):+.2f} | "
            f"{100 * max(ra['top1_std'], rb['top1_std']):.2f} |")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--teacher", default=str(study.TEACHER), help="dense teacher checkpoint")
  p.add_argument("--arg", default="", help="extra configs/fashion_mnist.py arguments, "
                                           "e.g. 'tiny' (tests)")
  p.add_argument("--results", default=str(study.RESULTS), help="where JSON and PNG go")
  p.add_argument("--workdir", default=str(study.ROOT / "runs" / "ft"),
                 help="fine-tuning workdirs")
  sub = p.add_subparsers(dest="command", required=True)
  s = sub.add_parser("teacher", help="train the dense teacher and copy it into results/")
  s.add_argument("--phases", type=int, default=len(TEACHER_PHASES),
                 help="how many of the teacher's cosine cycles to run")
  s.add_argument("--suffix", default="", help="run names' suffix (another model's teacher)")
  s = sub.add_parser("offshelf", help="training-free methods at several keep ratios")
  s.add_argument("--methods", type=_methods, default=OFFSHELF_METHODS)
  s.add_argument("--keeps", type=_floats, default=KEEPS)
  s.add_argument("--rs", type=_ints, default=R_SWEEP)
  s.add_argument("--score", default="auto", help="etps / evit / topk attention score "
                                                 f"{scored.SCORES})")
  s.add_argument("--name", default="fmnist_offshelf", help="output JSON / PNG name")
  s = sub.add_parser("scores", help="the attention stages under each cls-free score")
  s.add_argument("--methods", type=_methods, default=("etps", "topk"))
  s.add_argument("--keeps", type=_floats, default=(0.7, 0.5, 0.3))
  s.add_argument("--scores", type=lambda v: tuple(v.split(",")),
                 default=("received", "mean_query", "map_probe"))
  s.add_argument("--name", default="fmnist_map_scores", help="output JSON name")
  s = sub.add_parser("finetune", help="fine-tuned comparisons over seeds")
  s.add_argument("--methods", type=_methods, default=FINETUNE_METHODS)
  s.add_argument("--keeps", type=_floats, default=(0.5, 0.3))
  s.add_argument("--seeds", type=_ints, default=(0, 1, 2))
  s.add_argument("--steps", type=int, default=500,
                 help="the length the curve picked (results/fmnist_curve.json)")
  s.add_argument("--report", action="store_true",
                 help="write the JSON and plot from the finished runs; train nothing")
  s.add_argument("--publish", action="store_true",
                 help="copy the seed-0 models at --publish_keep into results/fmnist_finetuned/")
  s.add_argument("--publish_keep", type=float, default=0.5)
  s = sub.add_parser("curve", help="test top-1 along one long fine-tune per learned method")
  s.add_argument("--methods", type=_methods, default=registry.learned())
  s.add_argument("--keep", type=float, default=0.5)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--at", type=_ints, default=(100, 250, 500, 1000, 2000))
  s.add_argument("--report", action="store_true",
                 help="write the JSON from the evaluations so far; train nothing")
  s = sub.add_parser("pictures", help="kept / pruned / host pictures")
  s.add_argument("--methods", type=_methods, default=("dtps", "etps", "evit", "topk"))
  s.add_argument("--keep", type=float, default=0.5)
  s.add_argument("--images", type=_ints, default=(0, 1, 2, 3))
  s = sub.add_parser("search", help="DiffRate's rate search for a MACs target, and its "
                     "schedule for DiffRate, eTPS, top-k and EViT")
  s.add_argument("--target", type=float, default=0.5, help="fraction of the dense MACs")
  s.add_argument("--steps", type=int, default=300)
  s.add_argument("--batch", type=int, default=128)
  s.add_argument("--lr", type=float, default=0.01, help="the authors' arch-lr")
  s.add_argument("--lamb", type=float, default=5.0, help="the authors' flops weight")
  s.add_argument("--unit", type=float, default=1e7,
                 help="MACs per unit of the flops loss (the authors' 1e9 on DeiT)")
  s.add_argument("--warmup", type=int, default=0, help="steps without the flops loss")
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--methods", type=_methods, default=("etps", "topk", "evit"))
  s.add_argument("--offshelf", default="fmnist_offshelf",
                 help="results JSON whose fixed-schedule point nearest in MACs is compared")
  s.add_argument("--name", default="fmnist_diffrate")
  s = sub.add_parser("report", help="markdown tables of the results JSON")
  s.add_argument("--offshelf", default="fmnist_offshelf",
                 help="which off-the-shelf JSON (e.g. fmnist_offshelf_gap)")
  s.add_argument("--plot", default=None, metavar="PNG",
                 help="also plot every training-free point (the sweep, --extra, DiffRate's "
                      "searched schedule) on one figure")
  s.add_argument("--extra", type=lambda v: tuple(x for x in v.split(",") if x), default=(),
                 help="more off-the-shelf JSONs (e.g. fmnist_offshelf_pitome), each point "
                      "beside the nearest-MACs eTPS and ToMe points")
  s.add_argument("--diffrate", default="fmnist_diffrate",
                 help="the search's results JSON whose DiffRate rows --plot adds (as "
                      "`search --name` wrote it; skipped when absent)")
  s = sub.add_parser("quick", help="the main job: the committed models, compared")
  s.add_argument("--keep", type=float, default=0.5)
  s.add_argument("--finetune", type=int, default=0, metavar="STEPS",
                 help="fine-tune the four learned models here for STEPS steps (live) instead "
                      "of loading the committed ones")
  s.add_argument("--methods", type=_methods, default=FINETUNE_METHODS,
                 help="the learned methods to show (dtps first: its scorer is pictured)")
  s.add_argument("--models", default=str(FINETUNED),
                 help="the committed fine-tuned models (<method>_<keep>/params.npz)")
  s.add_argument("--study", default=str(STUDY_JSON),
                 help="the fine-tuning study whose mean ± std over seeds is shown")
  s.add_argument("--out", default=str(study.ROOT / "runs" / "quick"))
  s.add_argument("--overwrite", action="store_true",
                 help="delete --out first even if this job did not write it")
  args = p.parse_args(argv)
  {"teacher": teacher, "offshelf": offshelf, "scores": scores, "finetune": finetune,
   "pictures": pictures,
   "quick": quick, "report": report, "curve": curve, "search": rate_search}[args.command](args)


if __name__ == "__main__":
  from tps_jax import host  # pylint: disable=g-import-not-at-top
  host.reexec_with_tcmalloc()  # XLA's per-step buffers on the CPU: 1.4x (tps_jax/host.py)
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
