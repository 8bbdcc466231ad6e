"""PiToMe (Tran et al., NeurIPS 2024): in every block, after its attention, merge the crowded
(high-energy) tokens and protect the isolated ones; the first half of the blocks match
bipartitely over all tokens, as the authors' DeiT patch. docs/method.md, section 5."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods.base import check_keys
from tps_jax.methods.merging import PerBlockMerge
from tps_jax.methods.registry import register


@dataclasses.dataclass(frozen=True)
class PiToMeOptions:
  """Attributes:
    r: tokens merged in each block: floor(T - T * keep_ratio) of the T patch tokens there.
    margins: the energy margin of each block (default 0.75 - 0.75 * block / depth, the
      authors' newest DeiT patch; docs/method.md section 5).
    bsm_blocks: the first `bsm_blocks` blocks match bipartitely over all tokens (the authors':
      half the blocks, rounded up); the rest merge only high-energy tokens.
    keep_ratio: the authors' `ratio`, per block.
  """
  r: tuple[int, ...] = ()
  margins: tuple[float, ...] = ()
  bsm_blocks: int = 0
  keep_ratio: float = 0.9


@register("pitome")
class PiToMe(PerBlockMerge):
  Options = PiToMeOptions

  def options(self, spec, geo):
    check_keys(self.name, spec, ("keep_ratio", "margins", "bsm_blocks"))
    depth = geo.depth
    ratio = spec.get("keep_ratio", 0.9)
    if isinstance(ratio, (list, tuple)) or not 0.5 <= float(ratio) <= 1.0:
      raise ValueError(f"pitome keep_ratio is one ratio per block in [0.5, 1] (the authors' "
                       f"`ratio`; below 0.5 its matching has too few tokens), got {ratio!r}.")
    margins = spec.get("margins")
    margins = (tuple(0.75 - 0.75 * i / depth for i in range(depth)) if margins is None
               else tuple(float(m) for m in margins))
    if len(margins) != depth:
      raise ValueError(f"pitome margins list {len(margins)} values for a model of depth {depth}.")
    bsm_blocks = int(spec.get("bsm_blocks", math.ceil(depth / 2)))
    if not 0 <= bsm_blocks <= depth:
      raise ValueError(f"pitome bsm_blocks must be in [0, {depth}], got {bsm_blocks}.")
    r, t = [], geo.num_patches
    for _ in range(depth):
      ri = math.floor(t - t * float(ratio))  # the authors' arithmetic, in Python floats
      r.append(ri)
      t -= ri
    return PiToMeOptions(tuple(r), margins, bsm_blocks, float(ratio))

  def revalidate(self, o, geo, spec):
    if len(o.margins) != geo.depth:
      raise ValueError(f"this pitome plan was made for depth {len(o.margins)}, the model has "
                       f"{geo.depth} blocks.")
    return super().revalidate(o, geo, spec)

  def block(self, o, i, block, state, ctx):
    y, info = block.attend(state.x)  # the authors' DeiT patch: no proportional attention
    p = ctx.prefix

    def merge(y, size, keys, r=o.r[i], margin=o.margins[i],
              matching="bsm" if i < o.bsm_blocks else "pitome"):
      index = ops.pitome_match(keys[:, p:], r, margin=margin, matching=matching)
      t = y.shape[1] - p
      merged_x, merged_size = ops.merge_by_index(y[:, p:], size[:, p:], index, t - r)
      new_index = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (y.shape[0], p)), p + index], 1)
      return (jnp.concatenate([y[:, :p], merged_x], 1),
              jnp.concatenate([size[:, :p], merged_size], 1), new_index)

    state = state.after_merge(*ctx.checkpoint(merge)(y, state.size, info.keys))
    return state.replace(x=block.feed(state.x))

  def extra_macs(self, o, geo, dims):
    # cosine similarities of the T patch tokens' keys (head dim), then the merge as this library
    # runs it (ops.planned_merge): gathers and an (r, T - r) one-hot product of the size-weighted
    # tokens and the sizes
    reduction, t = 0, geo.num_patches
    for r in o.r:
      if r:
        reduction += t * t * (dims.width // dims.num_heads) + r * (t - r) * (dims.width + 1)
        t -= r
    return {"reduction": reduction}

  def spec(self, *, keep_ratio=0.9, locations=None, r=0):
    return {"method": self.name, "keep_ratio": keep_ratio}

  def example(self, geo):  # keep 0.9 per block: 2.61 GMACs on DeiT-S, ToMe r = 13's 2.71
    return {"method": self.name, "keep_ratio": 0.9}

  def identity(self, geo):
    return {"method": self.name, "keep_ratio": 1.0}
