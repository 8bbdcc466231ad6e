"""The optimised inference program of each method, counted: instructions, fusions, dots,
gathers, scatters (XLA's HLO after optimisation), and the analytic MACs. Two trees with the
same census compile to the same program shape (`benchmarks.ab --census` compares them).

  python -m benchmarks.hlo_census [--model Ti/16] [--batch 2] [--out F]
"""

from __future__ import annotations

import argparse
import collections
import sys

import jax
import jax.numpy as jnp

from tps_jax import atomic

SPECS = {"none": None, "dtps": dict(method="dtps", keep_ratio=0.7, locations=(3, 6, 9)),
         "etps": dict(method="etps", keep_ratio=0.7, locations=(3, 6, 9)),
         "tome": dict(method="tome", r=13), "mctf": dict(method="mctf", r=16),
         "pitome": dict(method="pitome", keep_ratio=0.9)}


def census(model_name: str, batch: int) -> list[dict]:
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  rows = []
  for name, spec in SPECS.items():
    m = Model(1000, variant=model_name, reduction=spec)
    x = jax.ShapeDtypeStruct((batch, 224, 224, 3), jnp.float32)
    p = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(x.shape)))
    hlo = jax.jit(lambda p, x: m.apply(p, x)[0]).lower(p, x).compile().as_text()
    # each instruction's opcode: the word before its operands ("%f = f32[..] fusion(...)")
    ops = collections.Counter(line.split("=")[1].split("(")[0].strip().split(" ")[-1]
                              for line in hlo.splitlines() if " = " in line and "ENTRY" not in line)
    rows.append({"method": name, "instructions": sum(ops.values()), "fusions": ops["fusion"],
                 "dots": ops["dot"] + ops["convolution"], "gathers": ops["gather"],
                 "scatters": ops["scatter"], "macs": flops.macs(m)})
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="Ti/16")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--out", default=None, help="JSON rows (stdout when absent)")
  args = parser.parse_args(argv)
  rows = census(args.model, args.batch)
  text = atomic.to_json(rows)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
  else:
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
