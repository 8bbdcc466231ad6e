"""MCTF: multi-criteria token fusion (Lee, Choi and Kim, CVPR 2024).

Operator of the authors' `utils/mctf.py` (mlvlab/MCTF), with static shapes. Tokens
alternate into sets A (even places) and B (odd places), as in ToMe, but the match
weight of an A token a and a B token b multiplies three criteria:

  W_sim  = ((cos(x_a, x_b) + 1) / 2) ** (1 / tau_sim)      similarity of the tokens
  W_info = (i_a * i_b) ** (1 / tau_info)                    informativeness:
           i = 1 / (attention received, mean over heads and queries), over its max
  W_size = (s_a * s_b) ** (1 / tau_size)                    size: s = 1 / size, over its max

(a tau of 0 drops its criterion). With `bidirection`, r // 2 A tokens merge into B
first, then r - r // 2 B tokens into the A tokens that stayed, scored by the same
weights; otherwise r A tokens merge into B. The protected tokens (cls) lead set A
and never merge.

`mctf_match` returns `new_index` (B, T): each token's place in the authors' output
order (bidirectional: [A tokens that stay, ascending, then the B tokens that stay, best
match first]; one-way: [A tokens that stay, then B]). `mctf_merge` fuses the tokens that
share a place by a weighted average: the authors' pooling "attn" (their default:
weight = attention received x size / max size), "size" (ToMe's) or "mean". The
authors' fourth pooling (max) is not offered. `r` is a Python int: one trace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast
from tps_jax.ops.merge import (MergePlan, max_merge, merge_plan, normalize, planned_merge,
                               protected_first)

POOLINGS = ("attn", "size", "mean")  # the authors' pooling_type 1, 0, 3


def _pair_weight(v: jax.Array, tau: float) -> jax.Array:
  """((1/v) / max(1/v)) of A times that of B, to the power 1 / tau: (B, T) -> (B, Ta, Tb)."""
  inv = 1.0 / v
  inv = inv / jnp.max(inv, axis=1, keepdims=True)
  return (inv[:, ::2, None] * inv[:, None, 1::2]) ** (1.0 / tau)


def mctf_scores(metric: jax.Array, attn: jax.Array | None, size: jax.Array | None, *,
                tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
                protected: int = 1) -> jax.Array:
  """The multi-criteria weights of every (A, B) pair: (B, Ta, Tb) float32.

  metric (B, T, C) the tokens; attn (B, T) attention each token receives (mean over
  heads and queries) or None; size (B, T) or None. No gradient flows through them.
  """
  b, t, _ = validate.check_rank("metric", metric, 3, "(B, T, C)")
  m = upcast(jax.lax.stop_gradient(metric))
  m = normalize(m)
  a_tok, b_tok = m[:, ::2], m[:, 1::2]
  t1, t2 = a_tok.shape[1], b_tok.shape[1]
  scores = jnp.ones((b, t1, t2), jnp.float32)
  if tau_sim:
    sim = jnp.einsum("bac,bdc->bad", a_tok, b_tok)
    scores = ((sim + 1.0) / 2.0) ** (1.0 / tau_sim)
  for name, v, tau in (("attn", attn, tau_info), ("size", size, tau_size)):
    if tau and v is not None:
      if tuple(v.shape) != (b, t):
        raise ValueError(f"{name} must have shape (B, T)={(b, t)} to match metric, got "
                         f"{tuple(v.shape)}.")
      scores = scores * _pair_weight(upcast(jax.lax.stop_gradient(v)), tau)
  if protected:  # protected A tokens (even) merge nowhere; protected B tokens take nothing
    scores = scores.at[:, :(protected + 1) // 2].set(-jnp.inf)
    scores = scores.at[:, :, :protected // 2].set(-jnp.inf)
  return scores


def mctf_match(metric: jax.Array, attn: jax.Array | None, size: jax.Array | None, r: int, *,
               tau_sim: float = 1.0, tau_info: float = 20.0, tau_size: float = 40.0,
               bidirection: bool = True, protected: int = 1) -> jax.Array:
  """Where each of T tokens goes when MCTF merges `r` of them away.

  Args:
    metric: (B, T, C) the tokens (the authors use the block's input, x itself).
    attn: (B, T) attention each token receives, averaged over heads and queries, or None.
    size: (B, T) patches each token stands for, or None (all 1).
    r: tokens merged away, a Python int in [0, max_merge(T, protected)].
    tau_sim, tau_info, tau_size: the criteria's temperatures (0 drops one).
    bidirection: merge r // 2 tokens A -> B, then r - r // 2 tokens B -> A.
    protected: leading tokens that never merge (1: cls; 0: a cls-free model; cls and
      registers), which lead the output in their order.

  Returns:
    new_index (B, T) int32 in [0, T - r): each token's output position.
  """
  b, t, _ = validate.check_rank("metric", metric, 3, "(B, T, C)")
  if tau_info and attn is None:
    raise ValueError("MCTF's informativeness (tau_info > 0) needs attn, the attention each "
                     "token receives; pass it or set tau_info=0.")
  r = validate.check_count("r", r, 0, max_merge(t, protected),
                           f"MCTF on {t} tokens ({protected} protected)")
  scores = mctf_scores(metric, attn, size, tau_sim=tau_sim, tau_info=tau_info,
                       tau_size=tau_size, protected=protected)
  t1, t2 = scores.shape[1:]
  r1, r2 = (r // 2, r - r // 2) if bidirection else (r, 0)
  rows = jnp.arange(b)[:, None]
  take = lambda a, i: jnp.take_along_axis(a, i, axis=-1)
  node_max = jnp.max(scores, axis=-1)
  node_idx = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  _, edge = jax.lax.top_k(node_max, t1)  # best matches first
  edge = edge.astype(jnp.int32)
  unm, src = edge[:, r1:], edge[:, :r1]
  if protected:  # the authors sort the staying A tokens (cls first) only with a cls
    unm = jnp.sort(unm, axis=-1)
  dst = take(node_idx, src)
  n_unm = t1 - r1
  pos_a = jnp.zeros((b, t1), jnp.int32).at[rows, unm].set(
      jnp.arange(n_unm, dtype=jnp.int32)[None])
  if bidirection:
    back = jnp.take_along_axis(scores, unm[..., None], axis=1).transpose(0, 2, 1)  # (B, Tb, Tu)
    node_max2 = jnp.max(back, axis=-1)
    node_idx2 = jnp.argmax(back, axis=-1).astype(jnp.int32)  # a place in the staying A list
    _, edge2 = jax.lax.top_k(node_max2, t2)
    edge2 = edge2.astype(jnp.int32)
    unm2, src2 = edge2[:, r2:], edge2[:, :r2]
    pos_b = jnp.zeros((b, t2), jnp.int32).at[rows, unm2].set(
        n_unm + jnp.arange(t2 - r2, dtype=jnp.int32)[None])
    pos_b = pos_b.at[rows, src2].set(take(node_idx2, src2))
  else:
    pos_b = jnp.broadcast_to(n_unm + jnp.arange(t2, dtype=jnp.int32), (b, t2))
  pos_a = pos_a.at[rows, src].set(take(pos_b, dst))  # a merged A token follows its B host
  new_index = jnp.zeros((b, t), jnp.int32).at[:, ::2].set(pos_a).at[:, 1::2].set(pos_b)
  return protected_first(new_index, protected, t - r) if protected > 1 else new_index


def pooling_weights(attn: jax.Array | None, size: jax.Array | None, pooling: str,
                    shape: tuple[int, int]) -> jax.Array:
  """Each token's weight in its merged token: (B, T) float32 (see POOLINGS)."""
  if pooling not in POOLINGS:
    raise ValueError(f"unknown MCTF pooling {pooling!r}; expected one of {POOLINGS} (the "
                     f"authors' max pooling is not offered).")
  size = jnp.ones(shape, jnp.float32) if size is None else upcast(size)
  if pooling == "mean":
    return jnp.ones(shape, jnp.float32)
  if pooling == "size":
    return size
  if attn is None:
    raise ValueError("MCTF pooling 'attn' needs the attention each token receives.")
  return upcast(jax.lax.stop_gradient(attn)) * (size / jnp.max(size, axis=1, keepdims=True))


def merge_rows(new_index: jax.Array, weights: jax.Array, num_out: int) -> jax.Array:
  """Each token's share of its output, (B, T, T') float32: the merge as one matrix (the
  reference form; the model merges by `mctf_merge`'s plan)."""
  w = jax.nn.one_hot(new_index, num_out, dtype=jnp.float32) * upcast(weights)[..., None]
  return w / jnp.sum(w, axis=1, keepdims=True)


def mctf_merge(x: jax.Array, size: jax.Array | None, weights: jax.Array,
               new_index: jax.Array, num_out: int
               ) -> tuple[jax.Array, jax.Array, MergePlan]:
  """Weighted average of the tokens that share an output position.

  x (B, T, C), size (B, T) or None (all 1), weights (B, T) > 0, new_index (B, T) in
  [0, num_out) -> (x (B, num_out, C) in x's dtype, size (B, num_out) float32 (summed), the
  MergePlan, which merges anything else laid out like x with `planned_merge(y, weights,
  plan)` (the one-step-ahead attention's rows)). Gathers and an (r, num_out) one-hot product.
  """
  b, t, _ = validate.check_rank("x", x, 3, "(B, T, C)")
  for name, v in (("weights", weights), ("new_index", new_index)):
    if tuple(v.shape) != (b, t):
      raise ValueError(f"{name} must have shape (B, T)={(b, t)} to match x, got {v.shape}.")
  size = jnp.ones((b, t), jnp.float32) if size is None else upcast(size)
  plan = merge_plan(new_index, num_out)
  merged, _ = planned_merge(x, jax.lax.stop_gradient(upcast(weights)), plan)
  _, new_size = planned_merge(size[..., None], size, plan)
  return merged.astype(x.dtype), new_size, plan
