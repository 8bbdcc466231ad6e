"""A reduction method defined outside tps_jax, registered, and run in `Model` (docs/extending.md).

"norm_keep" keeps, after one block's attention, the tokens of largest L2 norm and drops the
rest. The method is the class below; nothing in tps_jax changes. Run it:

  python3 examples/custom_method.py

It builds a DeiT (cls token) and a big_vision GAP model with the method, runs them jitted,
and prints their tokens and MACs beside the dense models'. It writes only the five parts an
author must (register and Options, options, acts_at, block, example): its token counts and
MACs are read from its trace, its identity spec from its example. Every entry point takes it
by its path:

  python3 train.py --config configs/fashion_mnist.py:method=examples/custom_method.py \
      --workdir runs/norm_keep --config.model.reduction.keep_ratio=0.3
  python3 -m benchmarks.throughput --methods none examples/custom_method.py
  python3 -m pytest tests/test_methods.py --method examples/custom_method.py
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from tps_jax import flops, methods  # noqa: E402
from tps_jax.methods import stages  # noqa: E402
from tps_jax.models.vit import Model  # noqa: E402


@dataclasses.dataclass(frozen=True)
class NormKeepOptions:
  at: int  # the block whose attention output is scored
  keep: int  # reducible tokens kept


@methods.register("norm_keep")
class NormKeep(methods.Method):
  """Keeps the `keep_ratio` of tokens with the largest norm after block `at`'s attention."""
  Options = NormKeepOptions

  def options(self, spec, geo):
    methods.check_keys(self.name, spec, ("at", "keep_ratio"))
    at, ratio = int(spec.get("at", geo.depth // 2)), float(spec.get("keep_ratio", 0.5))
    if not 0 <= at < geo.depth or not 0 < ratio <= 1:
      raise ValueError(f"norm_keep needs a block in [0, {geo.depth}) and a ratio in (0, 1].")
    return NormKeepOptions(at, max(1, round(ratio * geo.num_patches)))

  def acts_at(self, o, i):
    return i == o.at

  def block(self, o, i, block, state, ctx):
    y, _ = block.attend(state.x)
    scores = jnp.linalg.norm(y[:, ctx.prefix:].astype(jnp.float32), axis=-1)
    st = ctx.checkpoint(lambda y, s, pos, size: stages.prune_by_scores(
        y, s, pos, o.keep, method="drop", num_patches=ctx.num_patches, prefix=ctx.prefix,
        size=size, ordered=ctx.ordered))(y, scores, state.positions, state.size)
    return state.after_stage(st, ctx).replace(x=block.feed(st.x))

  def example(self, geo):
    return {"method": self.name, "keep_ratio": 0.5}


def run(name: str, model) -> dict:
  images = jax.random.normal(jax.random.key(0), (2, model.image_size, model.image_size, 3))
  params = jax.jit(model.init)(jax.random.key(1), images)
  logits, out = jax.jit(model.apply)(params, images)
  row = {"model": name, "method": model.reduction.method, "tokens": out["encoded"].shape[1],
         "gmacs": flops.macs(model) / 1e9, "finite": bool(jnp.isfinite(logits).all())}
  print(f"{row['model']:<22} {row['method']:<10} {row['tokens']:>6} {row['gmacs']:>7.3f}")
  return row


def main(image_size: int = 224, at: int = 4, **model_kw) -> list[dict]:
  """The four rows, the method at block `at`; `image_size` and `model_kw` (such as depth):
  smaller models for tests."""
  spec = {"method": "norm_keep", "at": at, "keep_ratio": 0.5}
  print(f"{'model':<22} {'method':<10} {'tokens':>6} {'GMACs':>7}")
  rows = []
  for name, kw in (("DeiT-Ti/16", dict(variant="Ti/16")),
                   ("big_vision Ti/16 GAP", dict(variant="Ti/16", layout="big_vision",
                                                 pool_type="gap"))):
    for reduction in (None, spec):
      rows.append(run(name, Model(10, reduction=reduction, image_size=image_size,
                                  **kw, **model_kw)))
  return rows


if __name__ == "__main__":
  main()
