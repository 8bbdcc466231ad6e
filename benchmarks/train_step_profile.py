"""Where a train step's device time goes: time several step variants in one process, and
break chosen ones down by kernel from a profiler trace.

  python -m benchmarks.train_step_profile --specs '[{"method": "none"}, ...]' \\
      --trace 0,2 [--hlo 0] --out DIR

Each spec is a `benchmarks.train_step.row` configuration (defaults: DeiT-S, batch 256 on a
GPU, bf16, no teacher, no remat, exact policy, auto attention, device augmentation on; XLA
`compiler_options` optional). The rows share one process, so they report time and compile
time but not peak memory (that is `benchmarks.train_step`'s job: a process per row). For each
spec index in `--trace`, three steps are traced with `jax.profiler` and the device kernels
summed by kind (`benchmarks.kernels`: matmul, attention, convolution, reduction, elementwise
fusion, copy, other) and by kernel (top 25); the summary goes to DIR/profile.json as rows
finish, so a run stopped at a time limit keeps what it measured. For each index in `--hlo`,
the step's optimised HLO goes to DIR/hlo_I.txt.gz, where the trace's fusion names are defined.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=wrong-import-position

from benchmarks import common, train_step  # pylint: disable=wrong-import-position
from tps_jax import atomic  # pylint: disable=wrong-import-position

def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--specs", required=True, help="JSON list of row configurations")
  parser.add_argument("--trace", default="", help="comma-separated spec indices to trace")
  parser.add_argument("--hlo", default="", help="comma-separated spec indices to dump HLO of")
  parser.add_argument("--out", default="benchmarks/out/profile")
  args = parser.parse_args(argv)
  gpu = jax.default_backend() != "cpu"
  defaults = dict(case="deit_s", method="none", teacher=False, batch=256 if gpu else 16,
                  remat=False, policy_form="exact", bf16=gpu, repeats=20 if gpu else 2,
                  attention="auto", augment=True)
  traced = {int(i) for i in args.trace.split(",") if i}
  dumped = {int(i) for i in args.hlo.split(",") if i}
  out_dir = pathlib.Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  report = {"machine": common.machine(), "rows": []}
  for i, spec in enumerate(json.loads(args.specs)):
    spec = {**defaults, **spec}
    try:
      trace = str(out_dir / f"trace_{i}.json.gz") if i in traced else None
      hlo = str(out_dir / f"hlo_{i}.txt.gz") if i in dumped else None
      r = {**spec, **train_step.row(**spec, trace=trace, hlo=hlo)}
      r["step_ms"] = 1e3 * r["step_s"]
    except Exception as e:  # pylint: disable=broad-except
      r = {**spec, "error": f"{type(e).__name__}: {str(e)[:1500]}"}
    report["rows"].append(r)
    atomic.write_json(out_dir / "profile.json", report)
    desc = " ".join(f"{k}={spec[k]}" for k in ("method", "teacher", "remat", "policy_form",
                                                "attention", "augment"))
    if "error" in r:
      print(f"[{i}] {desc}: {r['error'][:300]}", flush=True)
    else:
      print(f"[{i}] {desc}: {r['step_ms']:.1f} ms/step, {r['img_per_s']:.0f} img/s "
            f"(compile {r['compile_s']:.0f} s)", flush=True)
      if "kernels" in r and "by_kind_ms" in r["kernels"]:
        print("     " + ", ".join(f"{k} {v:.1f}" for k, v in
                                  r["kernels"]["by_kind_ms"].items()) +
              f"; device {r['kernels']['device_ms_per_step']:.1f} ms", flush=True)
    jax.clear_caches()
  common.print_table([r for r in report["rows"] if "error" not in r],
                     ["method", "teacher", "remat", "policy_form", "attention", "augment",
                      "step_ms", "img_per_s", "compile_s"])


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
