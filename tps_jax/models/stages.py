"""What one reduction stage does to the token sequence: pure functions on arrays.

Sequences carry cls at index 0 followed by the current tokens. `positions`
(B, N) tracks each current token's original patch index (-1 for a token that
is no patch, such as EViT's fused token) so the model can report which patches
were kept and where each pruned one was squeezed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tps_jax import ops


class StageOut(NamedTuple):
  """x: new sequence (B, 1 + k', C); positions (B, k'); decision (B, N0) kept patches;
  hosts (B, N0): original position of the host of each patch pruned here, else -1."""
  x: jax.Array
  positions: jax.Array
  decision: jax.Array
  hosts: jax.Array


def host_map(prune_pos: jax.Array, host_pos: jax.Array, num_patches: int) -> jax.Array:
  """(B, Np) pruned positions and their hosts' positions -> (B, N0), -1 elsewhere."""
  onehot = jax.nn.one_hot(prune_pos, num_patches, dtype=jnp.int32)  # -1 rows are zero
  placed = jnp.einsum("bpn,bp->bn", onehot, host_pos + 1)
  return placed - 1


def prune_by_scores(x: jax.Array, scores: jax.Array, positions: jax.Array, k: int, *,
                    method: str, num_patches: int, temperature: float = 1.0) -> StageOut:
  """Keeps the `k` best-scored tokens of x[:, 1:] and squeezes / fuses / drops the rest.

  x (B, 1 + N, C), scores (B, N), positions (B, N) int32.
  method: "squeeze" (TPS), "fuse" (EViT; `scores` are cls attention), or "drop".
  """
  keep_idx, prune_idx = ops.topk_split(scores, k)
  cls, tokens = x[:, :1], x[:, 1:]
  kept = ops.gather_tokens(tokens, keep_idx)
  pruned = ops.gather_tokens(tokens, prune_idx)
  keep_pos = jnp.take_along_axis(positions, keep_idx, axis=1)
  prune_pos = jnp.take_along_axis(positions, prune_idx, axis=1)
  hosts = jnp.full((x.shape[0], num_patches), -1, jnp.int32)

  if method == "squeeze" and pruned.shape[1]:
    kept, host = ops.squeeze_with_hosts(kept, pruned, temperature)
    hosts = host_map(prune_pos, jnp.take_along_axis(keep_pos, host, axis=1), num_patches)
  elif method == "fuse" and pruned.shape[1]:
    fused = ops.evit_fuse(pruned, jnp.take_along_axis(scores, prune_idx, axis=1))
    kept = jnp.concatenate([kept, fused], axis=1)
    keep_pos = jnp.pad(keep_pos, ((0, 0), (0, 1)), constant_values=-1)
  elif method not in ("squeeze", "fuse", "drop"):
    raise ValueError(f"unknown stage method {method!r}; expected squeeze, fuse or drop.")

  decision = ops.indices_to_mask(keep_pos, num_patches)
  return StageOut(jnp.concatenate([cls, kept], axis=1), keep_pos, decision, hosts)


def decide_masked(x: jax.Array, keep: jax.Array, live: jax.Array, *, squeeze: bool,
                  temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Training form of a learned stage, fixed shapes.

  x (B, 1 + N0, C); keep (B, N0) this stage's straight-through decision
  (already multiplied by `live`); live (B, N0) the tokens live before.
  Returns (x with pruned tokens squeezed into their hosts if `squeeze`,
  hosts (B, N0) patch index of each pruned token's host, -1 elsewhere).
  """
  b, n = keep.shape
  if not squeeze:
    return x, jnp.full((b, n), -1, jnp.int32)
  patches, host = ops.squeeze_masked_with_hosts(x[:, 1:], keep, (1.0 - keep) * live,
                                                temperature)
  return jnp.concatenate([x[:, :1], patches], axis=1), host
