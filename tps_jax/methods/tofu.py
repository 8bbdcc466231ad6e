"""Token Fusion (ToFu; Kim et al., WACV 2024): ToMe's bipartite matching in every block, but
the matched tokens are pruned in the early blocks and fused by MLERP in the late ones.
docs/method.md, section 10.

MLERP averages each destination with the tokens merged into it and rescales the average to the
largest norm among them, so that merging does not shrink the features as a plain average does.
The reference is OpenToMe's implementation (the authors published none), whose rescaling
divides by the destination's own norm before the merge (`norm_of="destination"`, the default,
equal to it); `norm_of="average"` divides by the average's norm, as the paper's formula.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods import stages
from tps_jax.methods.base import check_keys
from tps_jax.methods.merging import PerBlockMerge
from tps_jax.methods.registry import register
from tps_jax.methods.tome import schedule
from tps_jax.ops.dtypes import upcast

NORMS = ("destination", "average")


def _halves(x: jax.Array, match: ops.ToMeMatch):
  """float32 set A's (B, Na, C), set B's (B, Nb, C) tokens and the merged A tokens (B, r, C)."""
  a, b = upcast(x[:, ::2]), upcast(x[:, 1::2])
  return a, b, jnp.take_along_axis(a, match.src[..., None], axis=1)


def prune_matched(x: jax.Array, match: ops.ToMeMatch) -> jax.Array:
  """x (B, N, C) -> (B, N - r, C): [unmerged A, B] (protected tokens first: ops.tome.arrange),
  the matched A tokens dropped."""
  a = x[:, ::2]
  return ops.tome.arrange(jnp.concatenate(
      [jnp.take_along_axis(a, match.unmerged[..., None], axis=1), x[:, 1::2]], axis=1),
      match, x.shape[1])


def mlerp_merge(x: jax.Array, match: ops.ToMeMatch, norm_of: str = "destination") -> jax.Array:
  """x (B, N, C) -> (B, N - r, C): each B token becomes the mean of itself and the A tokens
  matched to it, rescaled to the largest norm among them (over its own norm before the merge,
  "destination", or the mean's, "average"). Float32 inside, x's dtype out."""
  if norm_of not in NORMS:
    raise ValueError(f"unknown tofu norm_of {norm_of!r}; expected one of {NORMS}.")
  a, b, src = _halves(x, match)
  onehot = jax.nn.one_hot(match.dst, b.shape[1], dtype=b.dtype)  # (B, r, Nb)
  mean = (b + jnp.einsum("brn,brc->bnc", onehot, src)) / (1.0 + jnp.sum(onehot, 1))[..., None]
  b_norm = jnp.linalg.norm(b, axis=-1)
  src_norm = jnp.linalg.norm(src, axis=-1)  # (B, r)
  largest = jnp.maximum(b_norm, jnp.max(onehot * src_norm[..., None], axis=1))
  denom = b_norm if norm_of == "destination" else jnp.linalg.norm(mean, axis=-1)
  fused = mean / denom[..., None] * largest[..., None]
  unmerged = jnp.take_along_axis(a, match.unmerged[..., None], axis=1)
  return ops.tome.arrange(jnp.concatenate([unmerged, fused], axis=1), match,
                          x.shape[1]).astype(x.dtype)


def _dropped_to_minus_one(new_index: jax.Array, match: ops.ToMeMatch) -> jax.Array:
  """A ToMe new_index with the matched A tokens (pruned, not merged) sent nowhere (-1)."""
  na = (new_index.shape[1] + 1) // 2
  is_src = jnp.sum(jax.nn.one_hot(match.src, na, dtype=jnp.int32), axis=1) > 0  # (B, Na)
  return new_index.at[:, 0::2].set(jnp.where(is_src, -1, new_index[:, 0::2]))


@dataclasses.dataclass(frozen=True)
class ToFuOptions:
  """Attributes:
    r: tokens merged in each block (length depth).
    prune_blocks: the first `prune_blocks` blocks prune the matched tokens, the rest fuse them
      (OpenToMe's: blocks 0 .. depth // 2 prune).
    norm_of: the MLERP rescaling's denominator ("destination" as OpenToMe, "average").
  """
  r: tuple[int, ...] = ()
  prune_blocks: int = 0
  norm_of: str = "destination"


@register("tofu")
class ToFu(PerBlockMerge):
  Options = ToFuOptions
  tracks_sizes = False  # OpenToMe's ToFu has no proportional attention (and no sizes)

  def options(self, spec, geo):
    check_keys(self.name, spec, ("r", "locations", "prune_blocks", "norm_of"))
    prune_blocks = int(spec.get("prune_blocks", geo.depth // 2 + 1))
    if not 0 <= prune_blocks <= geo.depth:
      raise ValueError(f"tofu prune_blocks must be in [0, {geo.depth}], got {prune_blocks}.")
    norm_of = spec.get("norm_of", "destination")
    if norm_of not in NORMS:
      raise ValueError(f"unknown tofu norm_of {norm_of!r}; expected one of {NORMS}.")
    return ToFuOptions(schedule({k: spec[k] for k in ("r", "locations") if k in spec}, geo,
                                self.name),
                       prune_blocks, norm_of)

  def block(self, o, i, block, state, ctx):
    y, info = block.attend(state.x)
    prune = i < o.prune_blocks
    follow = state.owner is not None

    def merge(y, size, keys, r=o.r[i]):
      match = ops.bipartite_soft_matching(keys, r, protected=ctx.prefix)
      y = prune_matched(y, match) if prune else mlerp_merge(y, match, o.norm_of)
      if size is not None:  # what pooling weighs by: pruned tokens' patches are gone
        size = (prune_matched(size[..., None], match)[..., 0] if prune
                else ops.merge_sum(size[..., None], match)[..., 0])
      new_index = None
      if follow:
        new_index = stages.tome_new_index(match, state.x.shape[1])
        new_index = _dropped_to_minus_one(new_index, match) if prune else new_index
      return y, size, new_index

    state = state.after_merge(*ctx.checkpoint(merge)(y, state.size, info.keys))
    return state.replace(x=block.feed(state.x))

  def extra_macs(self, o, geo, dims):
    # the matching's cosine similarities (head dim); MLERP's one-hot sum of the merged tokens
    reduction, n = 0, geo.num_patches
    for i, r in enumerate(o.r):
      if r:
        t = n + geo.prefix
        nb = t // 2
        reduction += ((t + 1) // 2) * nb * (dims.width // dims.num_heads)
        reduction += 0 if i < o.prune_blocks else r * nb * dims.width
        n -= r
    return {"reduction": reduction}

  def spec(self, *, keep_ratio=0.7, locations=None, r=0):
    return {"method": self.name, "r": r}

  def example(self, geo):  # ToMe's DeiT-S operating point, r = 13 of 196 patches, scaled
    return {"method": self.name, "r": max(1, round(13 * geo.num_patches / 196))}

  def identity(self, geo):
    return {"method": self.name, "r": 0}
