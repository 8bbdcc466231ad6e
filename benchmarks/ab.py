"""A/B inference throughput of this tree against another checkout (e.g. the commit before a
change), in one run: rounds alternate the two trees' `benchmarks.throughput` subprocesses on
the same rows, so the machine's drift hits both alike. Prints each row's median images/s per
tree and their ratio; writes JSON to benchmarks/results/.

  git worktree add /tmp/base <commit>
  python -m benchmarks.ab --base /tmp/base [--methods none dtps etps tome] [--rounds 3]
  python -m benchmarks.ab --base /tmp/base --census   # the optimised programs' shapes instead
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from benchmarks import common

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rows_of(tree: pathlib.Path, args, out: pathlib.Path) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.throughput", "--models", args.model, "--batches",
         str(args.batch), "--dtypes", args.dtype, "--methods", *args.methods, "--repeats",
         str(args.repeats), "--no-timm", "--out", str(out)]
  subprocess.run(cmd, cwd=tree, check=True, stdout=subprocess.DEVNULL)
  return {r["method"]: r["img_per_s"] for r in json.loads(out.read_text())["rows"]
          if r.get("impl") == "tps_jax"}


def census_of(tree: pathlib.Path) -> list[dict]:
  """This tree's `benchmarks.hlo_census` run on `tree`'s code."""
  code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); "
          "import hlo_census; hlo_census.main([])")  # an older tree may lack this script
  out = subprocess.run([sys.executable, "-c", code], cwd=tree, check=True, capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(tree)}).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--base", required=True, help="the other checkout's root")
  parser.add_argument("--model", default="Ti/16")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--methods", nargs="+", default=["none", "dtps", "etps", "tome"])
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None)
  parser.add_argument("--census", action="store_true",
                      help="compare the optimised programs' instruction counts, not the speed")
  args = parser.parse_args(argv)
  trees = {"base": pathlib.Path(args.base).resolve(), "this": ROOT}
  if args.census:
    base, this = (census_of(t) for t in trees.values())
    rows = [{"method": b["method"], **{f"{k}_base": b[k] for k in b if k != "method"},
             "same": b == t} for b, t in zip(base, this)]
    common.write_json("hlo_census", {"args": vars(args), "base": base, "this": this,
                                     "rows": rows}, args.out)
    common.print_table(rows, ["method", "instructions_base", "fusions_base", "dots_base",
                              "gathers_base", "scatters_base", "macs_base", "same"])
    return
  seen = {t: {m: [] for m in args.methods} for t in trees}
  with tempfile.TemporaryDirectory() as tmp:
    for k in range(args.rounds):
      for name, tree in trees.items():
        for m, v in rows_of(tree, args, pathlib.Path(tmp) / f"{name}{k}.json").items():
          seen[name][m].append(v)
        print(f"  round {k + 1}/{args.rounds} {name}: done", flush=True)
  rows = []
  for m in args.methods:
    base, this = (statistics.median(seen[t][m]) for t in ("base", "this"))
    rows.append({"model": args.model, "batch": args.batch, "dtype": args.dtype, "method": m,
                 "base_img_per_s": base, "this_img_per_s": this, "ratio": this / base,
                 "base_runs": seen["base"][m], "this_runs": seen["this"][m]})
  common.write_json("ab", {"args": vars(args), "rows": rows}, args.out)
  common.print_table(rows, ["model", "batch", "dtype", "method", "base_img_per_s",
                            "this_img_per_s", "ratio"])


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
