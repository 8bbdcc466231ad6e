"""Who is reserved: static keep counts, top-k split of scores, token gather.

Keep counts are Python ints fixed at trace time (docs/method.md, section 2), so every
split has a static shape.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp

from tps_jax.ops import validate


def keep_counts(num_tokens: int, keep_ratio: float | Sequence[float],
                num_stages: int | None = None) -> tuple[int, ...]:
  """Patch tokens kept at each stage: `k_s = floor(num_tokens * rho_s)`.

  Args:
    num_tokens: N0, patch tokens before the first stage (cls excluded).
    keep_ratio: a scalar `rho` (cumulative: `rho_s = rho ** (s + 1)`, which
      needs `num_stages`) or one ratio per stage, each relative to N0.
    num_stages: number of stages for a scalar `keep_ratio`.

  Returns:
    A tuple of non-increasing ints, e.g. (137, 96, 67) for 196 tokens, 0.7, 3.
  """
  validate.check_count("num_tokens", num_tokens, 0, 2**31 - 1, "a token count")
  if isinstance(keep_ratio, (int, float)):
    if num_stages is None:
      raise ValueError("keep_counts: a scalar keep_ratio needs num_stages.")
    validate.check_count("num_stages", num_stages, 0, 2**31 - 1, "a stage count")
    ratios = [float(keep_ratio) ** (s + 1) for s in range(num_stages)]
    if not 0.0 < keep_ratio <= 1.0:
      raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}.")
  else:
    ratios = [float(r) for r in keep_ratio]
    if num_stages is not None and num_stages != len(ratios):
      raise ValueError(
          f"keep_ratio lists {len(ratios)} ratios but num_stages={num_stages}.")
    bad = [r for r in ratios if not 0.0 < r <= 1.0]
    if bad:
      raise ValueError(f"every keep ratio must be in (0, 1], got {list(keep_ratio)}.")
  # The small slack keeps e.g. 196 * 0.7**2 = 96.039.. from rounding down wrongly
  # when a product lands a hair under an integer.
  counts = tuple(int(math.floor(num_tokens * r + 1e-6)) for r in ratios)
  if any(b > a for a, b in zip(counts, counts[1:])):
    raise ValueError(f"keep counts must not increase from stage to stage, got {counts}.")
  return counts


def topk_split(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Splits token indices by score into the top `k` and the rest.

  scores (B, N) -> keep_idx (B, k), prune_idx (B, N - k), both int32, each in
  descending score order. `k` is a Python int in [0, N]; ties go to the lower
  index. Gradients do not flow through indices.
  """
  b, n = validate.check_rank("scores", scores, 2, "(B, N)")
  k = validate.check_count("k", k, 0, n, f"scores of shape {(b, n)}")
  # One full sort (top_k with k = N) gives both sets without overlap on ties.
  _, order = jax.lax.top_k(jax.lax.stop_gradient(scores).astype(jnp.float32), n)
  order = order.astype(jnp.int32)
  return order[:, :k], order[:, k:]


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Selects tokens per example: x (B, N, C), idx (B, K) int -> (B, K, C)."""
  b, n, _ = validate.check_rank("x", x, 3, "(B, N, C)")
  ib, _ = validate.check_rank("idx", idx, 2, "(B, K)")
  validate.check_same("batch sizes", ("x", "idx"), ((b, n), tuple(idx.shape)), (b, ib))
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"idx must be integer token indices, got dtype {idx.dtype}.")
  return jnp.take_along_axis(x, idx[..., None], axis=1)


def indices_to_mask(idx: jax.Array, num_tokens: int) -> jax.Array:
  """(B, K) token indices -> (B, num_tokens) float32 0/1 mask (a masked one-hot sum)."""
  validate.check_rank("idx", idx, 2, "(B, K)")
  return jnp.sum(jax.nn.one_hot(idx, num_tokens, dtype=jnp.float32), axis=1)
