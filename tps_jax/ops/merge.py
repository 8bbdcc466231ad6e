"""The merging helpers the methods share: a merge laid out as gathers (`MergePlan`), its
weighted average, the cap on one bipartite matching, and the plain cosine normalisation.

Every shape is static: a merge of T tokens into T' outputs is T' gathers for each output's
first token plus an (r, T') one-hot product for the r = T - T' others, not a scatter.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast


def max_merge(num_tokens: int, protected: int = 1) -> int:
  """The largest `r` one bipartite matching (ToMe's, MCTF's) merges away from `num_tokens`
  tokens with `protected` leading ones that never merge: half the rest, rounded down."""
  return (num_tokens - int(protected)) // 2


def protected_first(new_index: jax.Array, protected: int, num_out: int) -> jax.Array:
  """A merge's `new_index` (B, T) in [0, num_out) rearranged so the `protected` leading tokens
  (cls, registers), which merge with nothing, take outputs 0 .. protected - 1 in their order,
  and every other output keeps its order after them. Identity for protected <= 1 where
  token 0 already leads."""
  if protected <= 0:
    return new_index
  b = new_index.shape[0]
  rows = jnp.arange(b)[:, None]
  landed = new_index[:, :protected]  # (B, P) where the protected tokens went
  is_prot = jnp.zeros((b, num_out), jnp.int32).at[rows, landed].set(1)
  rank = protected + jnp.cumsum(1 - is_prot, axis=1) - 1  # the others, in order, after them
  target = rank.at[rows, landed].set(jnp.arange(protected, dtype=jnp.int32)[None])
  moved = jnp.take_along_axis(target, jnp.maximum(new_index, 0), axis=1).astype(jnp.int32)
  return jnp.where(new_index >= 0, moved, new_index)


def normalize(x: jax.Array) -> jax.Array:
  """x / |x| over the last axis (the authors' cosine normalisation; TPS's squeeze adds an eps:
  ops.cosine_similarity)."""
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class MergePlan(NamedTuple):
  """A merge laid out for gathers: output o starts from token base[:, o]; the r other tokens
  src (B, r) add into outputs dst (B, r). base (B, T'), src and dst int32."""
  base: jax.Array
  src: jax.Array
  dst: jax.Array


def merge_plan(new_index: jax.Array, num_out: int) -> MergePlan:
  """The MergePlan of `new_index` (B, T) in [0, num_out), every output receiving a token: each
  output's first token is its base, the T - num_out others merge into theirs."""
  b, t = new_index.shape
  rows = jnp.arange(b)[:, None]
  ar = jnp.arange(t, dtype=jnp.int32)
  base = jnp.full((b, num_out), t, jnp.int32).at[rows, new_index].min(
      jnp.broadcast_to(ar, (b, t)))
  is_base = jnp.zeros((b, t), bool).at[rows, base].set(True)
  _, src = jax.lax.top_k(jnp.where(is_base, -1, t - ar), t - num_out)
  src = src.astype(jnp.int32)
  return MergePlan(base, src, jnp.take_along_axis(new_index, src, axis=1))


def planned_merge(x: jax.Array, weights: jax.Array, plan: MergePlan
                  ) -> tuple[jax.Array, jax.Array]:
  """Weighted average of the tokens each output gathers: x (B, T, C), weights (B, T) > 0 ->
  (x (B, T', C) float32, the weight totals (B, T') float32). Gathers for the T' bases and a
  (r, T') one-hot product for the r merged tokens: r / T of a (T, T') product's work."""
  take = lambda a, i: jnp.take_along_axis(a, i.reshape(i.shape + (1,) * (a.ndim - 2)), axis=1)
  w = upcast(weights)
  onehot = jax.nn.one_hot(plan.dst, plan.base.shape[1], dtype=jnp.float32)  # (B, r, T')
  w_src = take(w, plan.src)
  total = take(w, plan.base) + jnp.einsum("bro,br->bo", onehot, w_src)
  num = (take(w, plan.base)[..., None] * upcast(take(x, plan.base))
         + jnp.einsum("bro,brc->boc", onehot * w_src[..., None], upcast(take(x, plan.src))))
  return num / total[..., None], total


def merge_by_index(x: jax.Array, size: jax.Array | None, new_index: jax.Array,
                   num_out: int) -> tuple[jax.Array, jax.Array]:
  """Size-weighted average of the tokens that share an output position.

  x (B, N, C), size (B, N) or None (all 1), new_index (B, N) in [0, num_out) ->
  (x (B, num_out, C) in x's dtype, size (B, num_out) float32); total size is kept.
  Gathers and a (r, num_out) one-hot product (merge_plan), not a scatter of the tokens.
  Every output position must receive a token.
  """
  b, n, _ = validate.check_rank("x", x, 3, "(B, N, C)")
  if tuple(new_index.shape) != (b, n):
    raise ValueError(f"new_index must have shape (B, N)={(b, n)} to match x, got "
                     f"{new_index.shape}.")
  size = jnp.ones((b, n), jnp.float32) if size is None else upcast(size)
  merged, total = planned_merge(x, size, merge_plan(new_index, num_out))
  return merged.astype(x.dtype), total
