"""Token Merging (ToMe; Bolya et al., ICLR 2023): in each block, between its attention and its
MLP, bipartite soft matching on the head-mean keys merges `r` tokens into their most similar
partners by a size-weighted average; later attention adds each token's log size to its logits
(proportional attention). docs/method.md, section 4."""

from __future__ import annotations

import dataclasses

from tps_jax import ops
from tps_jax.methods import stages
from tps_jax.methods.base import Geometry, check_keys, size_bias
from tps_jax.methods.merging import PerBlockMerge
from tps_jax.methods.registry import register


@dataclasses.dataclass(frozen=True)
class ToMeOptions:
  """Attributes:
    r: tokens merged in each block (length depth)."""
  r: tuple[int, ...] = ()


def schedule(spec, geo: Geometry, name: str = "tome") -> tuple[int, ...]:
  """`r` (an int for every block, or for `locations`; or a per-block list), checked against
  ToMe's limit (at most half the tokens merge, cls never)."""
  r, locations, depth = spec.get("r", 0), spec.get("locations"), geo.depth
  if isinstance(r, (list, tuple)):
    if len(r) != depth:
      raise ValueError(f"{name} r lists {len(r)} values for a model of depth {depth}.")
    out = [int(x) for x in r]
  else:
    blocks = range(depth) if locations is None else [int(l) for l in locations]
    bad = [l for l in blocks if not 0 <= l < depth]
    if bad:
      raise ValueError(f"{name} locations {bad} are outside the model's blocks [0, {depth - 1}].")
    out = [int(r) if i in blocks else 0 for i in range(depth)]
  n = geo.num_patches + geo.prefix
  for i, ri in enumerate(out):
    most = ops.max_merge(n, geo.prefix)
    if not 0 <= ri <= most:
      raise ValueError(f"{name} r={ri} at block {i} does not fit: {n} tokens there allow "
                       f"at most {most} merges (schedule {out}).")
    n -= ri
  return tuple(out)


@register("tome")
class ToMe(PerBlockMerge):
  Options = ToMeOptions

  def options(self, spec, geo):
    check_keys(self.name, spec, ("r", "locations"))
    return ToMeOptions(schedule(spec, geo))

  def revalidate(self, o, geo, spec):
    return ToMeOptions(schedule({"r": o.r}, geo))

  def plain_bias(self, o, state):
    return size_bias(state)

  def block(self, o, i, block, state, ctx):
    y, info = block.attend(state.x, bias=size_bias(state))
    follow = state.owner is not None

    def merge(y, size, keys, r=o.r[i]):
      match = ops.bipartite_soft_matching(keys, r, protected=ctx.prefix)
      return (*ops.merge_wavg(y, size, match),
              stages.tome_new_index(match, y.shape[1]) if follow else None)

    state = state.after_merge(*ctx.checkpoint(merge)(y, state.size, info.keys))
    return state.replace(x=block.feed(state.x))

  def extra_macs(self, o, geo, dims):
    reduction, n = 0, geo.num_patches
    for r in o.r:
      if r:
        t = n + geo.prefix
        nb = t // 2
        reduction += ((t + 1) // 2) * nb * (dims.width // dims.num_heads) + r * nb * (dims.width + 1)
        n -= r
    return {"reduction": reduction}

  def spec(self, *, keep_ratio=0.7, locations=None, r=0):
    return {"method": self.name, "r": r}

  def example(self, geo):  # the paper's DeiT-S r = 13 of 196 patches, scaled
    return {"method": self.name, "r": max(1, round(13 * geo.num_patches / 196))}

  def identity(self, geo):
    return {"method": self.name, "r": 0}
