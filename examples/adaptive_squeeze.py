"""A method written from docs/extending.md alone, outside the package: "adaptive_squeeze".

At one block it scores each token by the attention it gets times the norm of its value vector
(the score of ATS and PPT), keeps the `keep_ratio` best, and decides per image what to do
with the rest: an image whose kept tokens already hold `keep_mass` of the score drops the
others (they carry little), any other image squeezes them into their most similar kept token.
The shapes are the same either way, so the choice is per image under jit (`stages.mixed`).

  python3 -m pytest tests/test_methods.py --method examples/adaptive_squeeze.py
  python3 -m benchmarks.throughput --methods none etps examples/adaptive_squeeze.py
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from tps_jax import methods
from tps_jax.methods import stages


@dataclasses.dataclass(frozen=True)
class AdaptiveSqueezeOptions:
  at: int  # the block whose attention scores the tokens
  keep: int  # reducible tokens kept
  keep_mass: float  # drop the rest where the kept tokens hold this share of the score


@methods.register("adaptive_squeeze")
class AdaptiveSqueeze(methods.Method):
  """Value-weighted attention scores; per image, squeeze or drop the tokens it prunes."""
  Options = AdaptiveSqueezeOptions
  tracks_sizes = True  # sizes follow the squeezed tokens (and pooling weighs by them)

  def options(self, spec, geo):
    methods.check_keys(self.name, spec, ("at", "keep_ratio", "keep_mass"))
    at = int(spec.get("at", geo.depth // 2))
    ratio, mass = float(spec.get("keep_ratio", 0.5)), float(spec.get("keep_mass", 0.8))
    if not 0 <= at < geo.depth:
      raise ValueError(f"adaptive_squeeze: block at={at} is not in [0, {geo.depth}).")
    if not 0 < ratio <= 1:
      raise ValueError(f"adaptive_squeeze: keep_ratio must be in (0, 1], got {ratio}.")
    return AdaptiveSqueezeOptions(at, max(1, round(ratio * geo.num_patches)), mass)

  def acts_at(self, o, i):
    return i == o.at

  def block(self, o, i, block, state, ctx):
    y, info = block.attend(state.x)
    p = ctx.prefix
    # Attention each token gets: from cls where there is one, else from the mean query.
    attn = info.cls_attn if ctx.has_cls else info.mean_query  # (B, H, T)
    values = info.values.reshape(info.values.shape[:2] + (-1,))  # (B, T, D)
    score = jnp.mean(attn, axis=1)[:, p:] * jnp.linalg.norm(
        values[:, p:].astype(jnp.float32), axis=-1)
    kept_mass = jnp.sum(jnp.sort(score, axis=-1)[:, ::-1][:, :o.keep], -1) / jnp.maximum(
        jnp.sum(score, -1), 1e-12)

    def stage(y, score, positions, size):
      run = lambda how: stages.prune_by_scores(
          y, score, positions, o.keep, method=how, num_patches=ctx.num_patches, prefix=p,
          size=size, ordered=ctx.ordered)
      return stages.mixed(kept_mass >= o.keep_mass, run("drop"), run("squeeze"))

    st = ctx.checkpoint(stage)(y, score, state.positions, state.size)
    state = state.after_stage(st, ctx)
    return state.replace(x=block.feed(state.x))

  def example(self, geo):
    return {"method": self.name, "keep_ratio": 0.5, "keep_mass": 0.6}
