"""Training images/s, memory and MFU of the trainer's jitted step, against timm + torch.compile.

  python -m benchmarks.train_step            # GPU: DeiT-S/16 224px, batch 256, bf16
  python -m benchmarks.train_step --quick    # the Fashion-MNIST ViT only (CPU)
  python -m benchmarks.train_step --max_batch   # also the largest batch that fits

Each row is the trainer's own step (`loop.make_train_step`: device augmentation
of uint8 batches, mixing, forward, the fine-tuning losses (docs/method.md, section 9), AdamW) for one (method,
teacher, remat, policy_form), run in its own subprocess so the device's peak
memory (`memory_stats`) is that row's. dTPS / DynamicViT run the masked path
with policy attention, as the authors train them. MFU counts training FLOPs as
6 x forward MACs (`flops.macs`, per image) over the bf16 matmul peak measured
in the same run. Where torch and timm import, timm's DeiT-S train step (AdamW,
bf16 autocast, torch.compile) is timed in a subprocess as the reference row.
The largest batch is found from XLA's compiled memory at two batch sizes
(linear in the batch) and checked by compiling it. Writes
benchmarks/results/train_step_<platform>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from benchmarks import common, kernels  # pylint: disable=wrong-import-position
from configs import common as common_cfg, fashion_mnist  # pylint: disable=wrong-import-position
from tps_jax import data, flops, timing  # pylint: disable=wrong-import-position
from tps_jax import methods  # pylint: disable=wrong-import-position
from tps_jax.models.vit import build_model  # pylint: disable=wrong-import-position
from tps_jax.trainer import loop, optim  # pylint: disable=wrong-import-position

LOSS = {"keep_weight": 2.0, "distill_weight": 0.5, "token_distill": True}
CASES = {
    "deit_s": {"label": "DeiT-S/16 224px", "channels": 3, "classes": 1000,
               "model": {"variant": "S/16", "image_size": 224}, "locations": (3, 6, 9),
               "preprocess": {"size": 224}},  # DeiT's: RandAugment m9, erasing 0.25
    "fmnist": {"label": "fmnist ViT 28px", "channels": 1, "classes": 10,
               "model": {**fashion_mnist.get_config().model.to_dict()}, "locations": (2, 4, 6),
               "preprocess": fashion_mnist.get_config().input.preprocess.to_dict()},
}


def _step(case: str, method: str, teacher: bool, batch: int, remat: bool, policy_form: str,
          bf16: bool, attention: str = "auto", augment: bool = True):
  """The jitted step, its arguments and its model, for one row.

  `attention`: the model's attention implementation; `augment=False` leaves out the device
  augmentation (RandAugment, erasing), to measure what it costs.
  """
  c = CASES[case]
  cfg = {**c["model"], "remat": remat, "policy_form": policy_form, "attention": attention,
         "reduction": common_cfg.reduction(method, 0.7, c["locations"])}
  model = build_model(cfg, c["classes"], mixed_precision=bf16)
  size, channels = model.image_size, c["channels"]
  rng = jax.random.key(0)
  params = jax.jit(model.init)(rng, jnp.zeros((1, size, size, channels)))["params"]
  tx, _ = optim.make_optimizer(params, total_steps=1000, lr=1e-4, warmup_steps=10,
                               backbone_lr_scale=0.01 if methods.get(method).learned else 1.0)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.key_data(rng)}
  t_model = t_params = None
  if teacher:
    t_model = build_model({**cfg, "reduction": None, "remat": False}, c["classes"],
                          mixed_precision=bf16)
    t_params = jax.jit(t_model.init)(rng, jnp.zeros((1, size, size, channels)))["params"]
  step = jax.jit(loop.make_train_step(model, tx, num_classes=c["classes"], mixing=data.Mixing(),
                                      loss_cfg=LOSS, teacher=t_model,
                                      preprocess=_preprocess(case, augment)),
                 donate_argnums=0)
  images = jax.random.randint(rng, (batch, size, size, channels), 0, 256, jnp.int32)
  batch_data = {"image": images.astype(jnp.uint8), "label": jnp.zeros((batch,), jnp.int32)}
  return step, (state, batch_data, t_params), model


def _preprocess(case: str, augment: bool) -> data.Preprocess:
  kw = dict(CASES[case]["preprocess"])
  if not augment:
    kw.update(randaugment=None, erasing=0.0)
  return data.Preprocess(**kw)


def _compiled_mb(compiled) -> float:
  return _memory_mb(compiled.memory_analysis())


def _memory_mb(mem) -> float:
  """XLA's compiled memory (arguments, outputs, temporaries, less donated aliases), MB."""
  if mem is None:
    return float("nan")
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) / 2**20


def row(case: str, method: str, teacher: bool, batch: int, remat: bool, policy_form: str,
        bf16: bool, repeats: int, attention: str = "auto", augment: bool = True,
        trace: str | None = None, compiler_options: dict | None = None,
        hlo: str | None = None) -> dict:
  """Times one configuration in this process (run it in a fresh one for its peak memory).

  `trace`: a path; if given, three more steps are traced there and their kernels summarised.
  `hlo`: a path (.txt.gz); if given, the optimised HLO of the step is written there, to look
  up a trace's kernels (fusion names) offline.
  `compiler_options`: XLA options for this compile (e.g. {"xla_gpu_autotune_level": 0}).
  """
  start = time.perf_counter()
  step, args, model = _step(case, method, teacher, batch, remat, policy_form, bf16, attention,
                            augment)
  compiled = step.lower(*args).compile(compiler_options)
  compile_s = time.perf_counter() - start
  if hlo:
    with gzip.open(hlo, "wt") as f:
      f.write(compiled.as_text())
  holder = {"state": args[0]}

  def one():
    holder["state"], m = compiled(holder["state"], *args[1:])
    return m["loss"]

  t = timing.time_call(one, repeats=repeats, warmup=2)
  out = {"impl": "tps_jax", "model": CASES[case]["label"], "method": method,
         "teacher": teacher, "batch": batch, "dtype": "bfloat16" if bf16 else "float32",
         "remat": remat, "policy_form": policy_form if methods.get(method).learned else "",
         "attention": attention, "augment": augment,
         "img_per_s": batch / t["median_s"], "step_s": t["median_s"], "compile_s": compile_s,
         "fwd_gmacs": flops.macs(model) / 1e9}
  mem = compiled.memory_analysis()
  out["xla_mem_mb"] = _memory_mb(mem)
  stats = jax.devices()[0].memory_stats() or {}
  out["peak_mem_mb"] = stats.get("peak_bytes_in_use", float("nan")) / 2**20
  if mem is not None and stats.get("bytes_limit"):  # activations grow with the batch, state not
    per_image = (mem.temp_size_in_bytes + mem.output_size_in_bytes
                 - mem.alias_size_in_bytes) / batch
    out["limit_mb"] = stats["bytes_limit"] / 2**20
    out["max_batch_est"] = int((stats["bytes_limit"] - mem.argument_size_in_bytes) / per_image)
  if trace:
    out["kernels"] = kernels.trace(one, keep=trace)
  return out


def max_batch(case: str, method: str, remat: bool, bf16: bool, limit_mb: float,
              probe: tuple[int, int] = (128, 256)) -> dict:
  """Largest batch whose compiled step fits `limit_mb`, from a linear fit of two compiles,
  checked by compiling it (compiles only: nothing is allocated or run). On a GPU these
  compiles skip XLA's autotuning, which picks kernels, not buffers, and takes compile time."""
  options = {"xla_gpu_autotune_level": 0} if jax.default_backend() == "gpu" else None
  mem = {}
  for b in probe:
    step, args, _ = _step(case, method, False, b, remat, "exact", bf16)
    mem[b] = _compiled_mb(step.lower(*args).compile(options))
  slope = (mem[probe[1]] - mem[probe[0]]) / (probe[1] - probe[0])
  fixed = mem[probe[0]] - slope * probe[0]
  guess = int((limit_mb - fixed) / slope) // 8 * 8
  step, args, _ = _step(case, method, False, guess, remat, "exact", bf16)
  checked = _compiled_mb(step.lower(*args).compile(options))
  return {"model": CASES[case]["label"], "method": method, "remat": remat,
          "max_batch": guess, "mb_per_image": slope, "fixed_mb": fixed,
          "compiled_mb_at_max": checked, "limit_mb": limit_mb}


def _subprocess(args: list[str], env=None) -> dict | None:
  rows = common.subprocess_rows(args, env)
  return rows[-1] if rows else None


def bf16_peak_tflops(n: int = 8192) -> float:
  """Measured bf16 matmul throughput of this device (the MFU denominator), on random data."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a: a @ a)
  t = timing.time_call(mm, a, repeats=10, warmup=3)
  return 2 * n ** 3 / t["median_s"] / 1e12


# Named rows: (method, teacher, remat, policy_form, augment).
VARIANTS = {
    "dense": ("none", False, False, "exact", True),
    "dense_remat": ("none", False, True, "exact", True),
    "dense_noaug": ("none", False, False, "exact", False),
    "dtps": ("dtps", False, False, "exact", True),
    "dtps_deferred": ("dtps", False, False, "deferred", True),
    "dtps_fused": ("dtps", False, False, "fused", True),
    "dtps_log_bias": ("dtps", False, False, "log_bias", True),
    "dtps_teacher": ("dtps", True, False, "exact", True),
    "dtps_fused_teacher": ("dtps", True, False, "fused", True),
    "dtps_remat": ("dtps", False, True, "exact", True),
    "dtps_fused_remat": ("dtps", False, True, "fused", True),
    "etps": ("etps", False, False, "exact", True),
    "etps_teacher": ("etps", True, False, "exact", True),
    "evit": ("evit", False, False, "exact", True),
}
CPU_VARIANTS = ("dense", "dense_remat", "dtps", "dtps_deferred", "dtps_fused", "dtps_log_bias",
                "dtps_teacher", "dtps_remat", "etps", "etps_teacher", "evit")


def _key(r: dict) -> tuple:
  return tuple(r.get(k) for k in ("impl", "model", "method", "teacher", "batch", "dtype",
                                  "remat", "policy_form", "augment"))


def _finish(rows: list[dict], peak: float) -> None:
  """MFU (where the row's own run measured the peak) and speed against the dense row."""
  for r in rows:
    if r.get("mfu") is None and peak == peak and r.get("fwd_gmacs"):
      r["mfu"] = r["img_per_s"] * 6 * r["fwd_gmacs"] * 1e9 / (peak * 1e12)
    dense = next((d for d in rows if d["impl"] == r["impl"] == "tps_jax" and
                  d["model"] == r["model"] and d["method"] == "none" and not d["remat"]
                  and d.get("augment", True) == r.get("augment", True)), None)
    r["vs_dense"] = r["img_per_s"] / dense["img_per_s"] if dense else None
    timm = next((t for t in rows if t["impl"] != "tps_jax" and t["model"] == r["model"]), None)
    r["vs_timm"] = r["img_per_s"] / timm["img_per_s"] if timm else None


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="the Fashion-MNIST ViT only")
  parser.add_argument("--variants", default=None,
                      help=f"comma-separated subset of {', '.join(VARIANTS)}")
  parser.add_argument("--timm", action=argparse.BooleanOptionalAction, default=True,
                      help="the timm + torch.compile reference row (GPU, where importable)")
  parser.add_argument("--max_batch", action="store_true", help="also the largest batches")
  parser.add_argument("--trace", default="", help="comma-separated variants to trace")
  parser.add_argument("--append", action="store_true",
                      help="keep the rows of an existing --out file that this run does not redo")
  parser.add_argument("--deadline_s", type=float, default=None,
                      help="start no row after this many seconds (the JSON is written per row)")
  parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # one row, as JSON
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  if args.row:
    print("ROW " + json.dumps(row(**json.loads(args.row))), flush=True)
    return
  start = time.perf_counter()
  # The rows run in subprocesses that need the device's memory: this process must not take it
  # (XLA preallocates 75% of a GPU on first use).
  env = dict(os.environ)
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  gpu = jax.default_backend() != "cpu"
  names = [n for n in args.variants.split(",") if n] if args.variants is not None else list(
      VARIANTS if gpu else CPU_VARIANTS)  # --variants "" runs none (e.g. --max_batch alone)
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
  plans = [("fmnist", 128, 10)] if args.quick or not gpu else []
  if not args.quick:
    plans.append(("deit_s", 256 if gpu else 32, 20 if gpu else 3))
  out_path = pathlib.Path(args.out) if args.out else (
      common.RESULTS / f"train_step_{jax.devices()[0].platform}.json")
  old = common.appendable(out_path) if args.append else {}
  rows, fits = [], list(old.get("max_batch", []))
  peak = bf16_peak_tflops() if gpu else float("nan")
  # Rows compile in their own processes; one persistent cache lets them share XLA's autotuning.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="tps_jax_cache_"))
  jax.config.update("jax_compilation_cache_dir", env["JAX_COMPILATION_CACHE_DIR"])
  traced = set(filter(None, args.trace.split(",")))

  def save():
    fresh = {_key(r) for r in rows}
    kept = [r for r in old.get("rows", []) if _key(r) not in fresh]
    all_rows = kept + rows
    _finish(all_rows, peak)
    common.write_json("train_step", {"rows": all_rows, "max_batch": fits,
                                     "bf16_peak_tflops": peak}, str(out_path))
    return all_rows

  def late():
    return args.deadline_s and time.perf_counter() - start > args.deadline_s

  if gpu and args.timm and not args.quick:  # first: the reference every target is held to
    ref = _subprocess(["-m", "benchmarks.timm_train_step", "--batch", "256"], env)
    if ref:
      rows.append({**ref, "fwd_gmacs": flops.macs(build_model(
          {**CASES["deit_s"]["model"]}, 1000)) / 1e9})
      print(f"  timm + torch.compile: {ref['img_per_s']:.0f} img/s", flush=True)
  for case, batch, repeats in plans:
    for name in names:
      if late():
        print(f"  deadline: {name} and later rows not run", flush=True)
        break
      method, teacher, remat, form, augment = VARIANTS[name]
      spec = dict(case=case, method=method, teacher=teacher, batch=batch, remat=remat,
                  policy_form=form, bf16=gpu, repeats=repeats, augment=augment)
      if name in traced:
        spec["trace"] = str(out_path.with_name(f"trace_{case}_{name}.json.gz"))
      r = _subprocess(["-m", "benchmarks.train_step", "--row", json.dumps(spec)], env)
      if r:
        r["variant"] = name
        print(f"  {r['model']} {name}: {r['img_per_s']:.1f} img/s, "
              f"peak {r['peak_mem_mb']:.0f} MB", flush=True)
        rows.append(r)
        save()
  if args.max_batch and gpu and not late():
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / 2**20
    fits = [f for f in fits if f.get("model") != CASES["deit_s"]["label"]]
    for method in ("none", "dtps"):
      for remat in (False, True):
        fits.append(max_batch("deit_s", method, remat, gpu, limit))
        print(f"  max batch {method} remat={remat}: {fits[-1]['max_batch']}", flush=True)
        save()
  all_rows = save()
  common.print_table(all_rows, ["impl", "model", "method", "teacher", "batch", "dtype", "remat",
                                "policy_form", "augment", "img_per_s", "vs_dense", "vs_timm", "xla_mem_mb",
                                "peak_mem_mb", "mfu"])
  if fits:
    common.print_table(fits, ["model", "method", "remat", "max_batch", "mb_per_image"])


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
