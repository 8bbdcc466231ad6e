"""What one reduction stage does to the token sequence: pure functions on arrays.

Sequences carry `prefix` protected tokens first (cls, or the readout token 0 of a
pool-"0" model; none for GAP / MAP models), then the current tokens. `positions`
(B, N) tracks each current token's original patch index (-1 for a token that
is no patch, such as EViT's fused token) so the model can report which patches
were kept and where each pruned one was squeezed.

Every stage also says where each token of the old sequence went (`new_index`,
(B, prefix + N) into the new sequence, -1 for a token dropped), so the model can
follow each patch to the token it ended in, and how many patches each new token
stands for (`size`), which GAP and MAP pooling weigh by.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tps_jax import ops

# What a stage does with the tokens it prunes: squeeze them into their hosts (TPS), fuse them
# into one token (EViT), or drop them.
PRUNE = ("squeeze", "fuse", "drop")


class StageOut(NamedTuple):
  """x: new sequence (B, P + k', C); positions (B, k'); decision (B, N0) kept patches;
  hosts (B, N0): original position of the host of each patch pruned here, else -1;
  new_index (B, P + N): where each old token went, -1 if dropped; size (B, P + k') patches
  each new token stands for (None if not asked)."""
  x: jax.Array
  positions: jax.Array
  decision: jax.Array
  hosts: jax.Array
  new_index: jax.Array
  size: jax.Array | None = None


def mixed(first: jax.Array, a: StageOut, b: StageOut) -> StageOut:
  """A stage that does `a` for some images and `b` for the others, in one static shape.

  first: (B,) bool, True where an image takes `a` (e.g. squeeze some images, drop for the
  rest: `prune_by_scores` with the same k and method "squeeze" / "drop"). a and b: StageOuts of
  the same shapes (both with sizes, or neither). Tokens, positions, decisions, hosts,
  where each token went and sizes are taken per image, so `TokenState.after_stage` follows it
  like any other stage.
  """
  def pick(u, v):
    if u.shape != v.shape:
      raise ValueError(f"a mixed stage needs two stages of the same shapes, got {u.shape} and "
                       f"{v.shape}.")
    return jnp.where(first.reshape((-1,) + (1,) * (u.ndim - 1)), u, v)
  if (a.size is None) != (b.size is None):
    raise ValueError("a mixed stage needs sizes in both stages or in neither.")
  return jax.tree.map(pick, a, b)


def host_map(prune_pos: jax.Array, host_pos: jax.Array, num_patches: int) -> jax.Array:
  """(B, Np) pruned positions and their hosts' positions -> (B, N0), -1 elsewhere."""
  onehot = jax.nn.one_hot(prune_pos, num_patches, dtype=jnp.int32)  # -1 rows are zero
  placed = jnp.einsum("bpn,bp->bn", onehot, host_pos + 1)
  return placed - 1


def follow(owner: jax.Array, new_index: jax.Array) -> jax.Array:
  """owner (B, N0) index of each patch's token in the old sequence (-1: none) -> the same in
  the new one, through a stage's `new_index` (B, N_old)."""
  moved = jnp.take_along_axis(new_index, jnp.maximum(owner, 0), axis=1)
  return jnp.where(owner >= 0, moved, -1)


def _add_to(size: jax.Array, idx: jax.Array, amount: jax.Array, n: int) -> jax.Array:
  """size (B, n) plus `amount` (B, M) added at `idx` (B, M) (-1: nowhere): a one-hot sum."""
  return size + jnp.einsum("bmn,bm->bn", jax.nn.one_hot(idx, n, dtype=size.dtype), amount)


def prune_by_scores(x: jax.Array, scores: jax.Array, positions: jax.Array, k: int, *,
                    method: str, num_patches: int, temperature: float = 1.0,
                    prefix: int = 1, size: jax.Array | None = None,
                    ordered: bool = False) -> StageOut:
  """Keeps the `k` best-scored tokens of x[:, prefix:] and squeezes / fuses / drops the rest.

  x (B, P + N, C), scores (B, N), positions (B, N) int32, size (B, P + N) or None.
  method: "squeeze" (TPS), "fuse" (EViT; `scores` are the attention scores), or "drop".
  """
  if method not in PRUNE:
    raise ValueError(f"unknown stage method {method!r}; expected squeeze, fuse or drop.")
  b, n = scores.shape
  keep_idx, prune_idx = ops.topk_split(scores, k)
  if ordered:  # the kept tokens in their sequence order (the sequence is the output)
    keep_idx = jnp.sort(keep_idx, axis=1)
  head, tokens = x[:, :prefix], x[:, prefix:]
  kept = ops.gather_tokens(tokens, keep_idx)
  pruned = ops.gather_tokens(tokens, prune_idx)
  keep_pos = jnp.take_along_axis(positions, keep_idx, axis=1)
  prune_pos = jnp.take_along_axis(positions, prune_idx, axis=1)
  hosts = jnp.full((b, num_patches), -1, jnp.int32)
  # Where each pruned token goes in the new sequence: dropped (-1) unless squeezed / fused.
  dest = jnp.full(prune_idx.shape, -1, jnp.int32)
  if size is not None:
    head_size, tok_size = size[:, :prefix], size[:, prefix:]
    new_size = jnp.take_along_axis(tok_size, keep_idx, axis=1)
    pruned_size = jnp.take_along_axis(tok_size, prune_idx, axis=1)

  if method == "squeeze" and pruned.shape[1] and k:
    kept, host = ops.squeeze_with_hosts(kept, pruned, temperature)
    hosts = host_map(prune_pos, jnp.take_along_axis(keep_pos, host, axis=1), num_patches)
    dest = prefix + host
    if size is not None:
      new_size = _add_to(new_size, host, pruned_size, k)
  elif method == "fuse" and pruned.shape[1]:
    fused = ops.evit_fuse(pruned, jnp.take_along_axis(scores, prune_idx, axis=1))
    kept = jnp.concatenate([kept, fused], axis=1)
    keep_pos = jnp.pad(keep_pos, ((0, 0), (0, 1)), constant_values=-1)
    dest = jnp.full(prune_idx.shape, prefix + k, jnp.int32)
    if size is not None:
      new_size = jnp.concatenate([new_size, jnp.sum(pruned_size, 1, keepdims=True)], axis=1)

  # new_index: the inverse of the (keep, prune) permutation applied to (kept slot, dest).
  order = jnp.concatenate([keep_idx, prune_idx], axis=1)  # a permutation of range(N)
  target = jnp.concatenate([jnp.broadcast_to(prefix + jnp.arange(k, dtype=jnp.int32), (b, k)),
                            dest], axis=1)
  tok_index = jnp.take_along_axis(target, jnp.argsort(order, axis=1), axis=1)
  new_index = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (b, prefix)), tok_index], axis=1)
  decision = ops.indices_to_mask(keep_pos, num_patches)
  out_size = None if size is None else jnp.concatenate([head_size, new_size], axis=1)
  return StageOut(jnp.concatenate([head, kept], axis=1), keep_pos, decision, hosts,
                  new_index, out_size)


def prune_then_merge(x: jax.Array, scores: jax.Array, positions: jax.Array, prune_k: int,
                     merge_k: int, *, num_patches: int, prefix: int = 1,
                     size: jax.Array | None = None, ordered: bool = False) -> StageOut:
  """DiffRate's stage: keeps the `prune_k` best-scored tokens of x[:, prefix:], then merges
  those beyond the best `merge_k` into their most similar kept token (ops.diffrate_merge).

  x (B, P + N, C), scores (B, N), positions (B, N), size (B, P + N) or None (all 1).
  """
  b, n = scores.shape
  _, order = jax.lax.top_k(scores, prune_k)  # best first
  order = order.astype(jnp.int32)
  keep_idx, src_idx = order[:, :merge_k], order[:, merge_k:]
  if ordered:  # the kept tokens in their sequence order (the sequence is the output)
    keep_idx = jnp.sort(keep_idx, axis=1)
  head, tokens = x[:, :prefix], x[:, prefix:]
  size = jnp.ones(x.shape[:2], jnp.float32) if size is None else size
  head_size, tok_size = size[:, :prefix], size[:, prefix:]
  take = lambda a, i: jnp.take_along_axis(a, i, axis=1)
  kept = jnp.concatenate([head, ops.gather_tokens(tokens, keep_idx)], axis=1)
  new_size = jnp.concatenate([head_size, take(tok_size, keep_idx)], axis=1)
  keep_pos = take(positions, keep_idx)
  hosts = jnp.full((b, num_patches), -1, jnp.int32)
  rows = jnp.arange(b)[:, None]
  tok_index = jnp.full((b, n), -1, jnp.int32).at[rows, keep_idx].set(
      prefix + jnp.arange(merge_k, dtype=jnp.int32)[None])
  if src_idx.shape[1]:
    kept, new_size, host = ops.diffrate_merge(kept, ops.gather_tokens(tokens, src_idx),
                                              new_size, take(tok_size, src_idx), prefix)
    host_pos = take(jnp.pad(keep_pos, ((0, 0), (prefix, 0)), constant_values=-1), host)
    hosts = host_map(take(positions, src_idx), host_pos, num_patches)
    tok_index = tok_index.at[rows, src_idx].set(host)
  new_index = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (b, prefix)), tok_index], axis=1)
  return StageOut(kept, keep_pos, ops.indices_to_mask(keep_pos, num_patches), hosts, new_index,
                  new_size)


def decide_masked(x: jax.Array, keep: jax.Array, live: jax.Array, *, squeeze: bool,
                  temperature: float = 1.0, prefix: int = 1,
                  size: jax.Array | None = None):
  """Training form of a learned stage, fixed shapes.

  x (B, P + N0, C); keep (B, N0) this stage's straight-through decision
  (already multiplied by `live`); live (B, N0) the tokens live before;
  size (B, P + N0) patches each token stands for, or None.
  Returns (x with pruned tokens squeezed into their hosts if `squeeze`,
  hosts (B, N0) token index of each pruned token's host, -1 elsewhere,
  new_index (B, P + N0) where each token went, -1 if dropped,
  size after the stage (None if not given): live tokens keep theirs (times the
  decision, which carries its gradient) plus those squeezed into them).
  """
  b, n = keep.shape
  pruned = (1.0 - keep) * live
  if squeeze:
    patches, host = ops.squeeze_masked_with_hosts(x[:, prefix:], keep, pruned, temperature)
    x = jnp.concatenate([x[:, :prefix], patches], axis=1)
  else:
    host = jnp.full((b, n), -1, jnp.int32)
  idx = jnp.arange(n, dtype=jnp.int32)[None]
  tok_index = jnp.where(keep > 0.5, prefix + idx, jnp.where(host >= 0, prefix + host, -1))
  new_index = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (b, prefix)), tok_index], axis=1)
  if size is not None:
    tok = size[:, prefix:]
    moved = _add_to(jnp.zeros_like(tok), host, tok * pruned, n) if squeeze else 0.0
    size = jnp.concatenate([size[:, :prefix], tok * keep + moved], axis=1)
  return x, host, new_index, size


def tome_new_index(match: ops.ToMeMatch, n: int) -> jax.Array:
  """Where each of `n` tokens goes under a ToMe match: A tokens (even positions) that stay
  come first in order, then the B tokens (odd), a merged A token into its B destination; with
  several protected tokens, they lead in their order (ops.tome.arrange_index)."""
  b = match.src.shape[0]
  na, nb = (n + 1) // 2, n // 2
  stay = match.unmerged.shape[1]
  onehot = lambda idx: jax.nn.one_hot(idx, na, dtype=jnp.int32)  # (B, M, Na)
  a_index = (jnp.einsum("bmn,bm->bn", onehot(match.unmerged),
                        jnp.broadcast_to(jnp.arange(stay, dtype=jnp.int32), (b, stay)))
             + jnp.einsum("bmn,bm->bn", onehot(match.src), stay + match.dst))
  b_index = jnp.broadcast_to(stay + jnp.arange(nb, dtype=jnp.int32), (b, nb))
  out = jnp.zeros((b, n), jnp.int32)
  return ops.tome.arrange_index(out.at[:, 0::2].set(a_index).at[:, 1::2].set(b_index), match)
