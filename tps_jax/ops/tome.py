"""ToMe bipartite soft matching with size tracking (Bolya et al. 2023; docs/method.md, section 3).

Tokens alternate into sets A (even positions) and B (odd positions). Each A
token finds its most similar B token (cosine of `metric`, e.g. keys averaged
over heads); the `r` A tokens with the best matches merge into their B match
by a size-weighted average, the others stay. Every shape is static (`r` is a
Python int) and the merge is a masked one-hot einsum, not a scatter.

Protected leading tokens (cls; with registers, cls and the registers) neither merge nor
receive a merge, and lead the merged sequence in their order: with one (cls) that is the
authors' [unmerged A, B] order; with more, a fixed permutation of it (`arrange`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from tps_jax.ops.squeezing import cosine_similarity
from tps_jax.ops import validate
from tps_jax.ops.merge import max_merge
from tps_jax.ops.dtypes import upcast


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=("unmerged", "src", "dst"), meta_fields=("protected",))
@dataclasses.dataclass(frozen=True)
class ToMeMatch:
  """Indices into set A (even tokens) and set B (odd tokens); a pytree whose `protected` is
  static, so a match crosses jit, scan and remat whole.

  unmerged: (B, Na - r) A tokens that stay, in ascending order.
  src:      (B, r) A tokens merged away.
  dst:      (B, r) index into B of each merged token's destination.
  protected: leading tokens that never merge (a Python int).
  """
  unmerged: jax.Array
  src: jax.Array
  dst: jax.Array
  protected: int = 1


def bipartite_soft_matching(metric: jax.Array, r: int, *, class_token: bool = True,
                            protected: int | None = None) -> ToMeMatch:
  """Matches `r` A tokens to B tokens.

  Args:
    metric: (B, N, Ck) features to compare (no gradient flows through them).
    r: tokens to merge away, a Python int in [0, max_merge(N, protected)] (ops.merge).
    class_token: token 0 is cls and is never merged (protected = 1).
    protected: leading tokens that neither merge nor receive a merge (cls and registers);
      overrides class_token.

  Returns:
    A ToMeMatch; apply it with `merge_wavg` / `merge_sum`.
  """
  b, n, _ = validate.check_rank("metric", metric, 3, "(B, N, Ck)")
  p = int(class_token) if protected is None else int(protected)
  r = validate.check_count("r", r, 0, max_merge(n, p),
                           f"ToMe on {n} tokens ({p} protected)")
  metric = jax.lax.stop_gradient(metric)
  scores = cosine_similarity(metric[:, ::2], metric[:, 1::2])  # (B, Na, Nb)
  if p:  # protected A tokens (even) merge nowhere; protected B tokens (odd) take nothing
    scores = scores.at[:, :(p + 1) // 2, :].set(-jnp.inf)
    scores = scores.at[:, :, :p // 2].set(-jnp.inf)
  node_max = jnp.max(scores, axis=-1)  # (B, Na)
  node_idx = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  na = node_max.shape[1]
  _, order = jax.lax.top_k(node_max, na)  # best matches first
  order = order.astype(jnp.int32)
  src = order[:, :r]
  unmerged = jnp.sort(order[:, r:], axis=-1)
  dst = jnp.take_along_axis(node_idx, src, axis=-1)
  return ToMeMatch(unmerged, src, dst, p)


def _order(match: ToMeMatch, n: int) -> np.ndarray | None:
  """The fixed order of the merged outputs ([unmerged A, B]) that puts the protected tokens
  first, in their order, or None where they lead already (at most one)."""
  p = match.protected
  if p <= 1:
    return None
  m = n - match.src.shape[1]
  stay = match.unmerged.shape[1]
  lead = [t // 2 if t % 2 == 0 else stay + t // 2 for t in range(p)]
  return np.asarray(lead + sorted(set(range(m)) - set(lead)), np.int32)


def arrange(merged: jax.Array, match: ToMeMatch, n: int) -> jax.Array:
  """Merged tokens (B, N - r, ...) of `n` in [unmerged A, B] order -> protected tokens first."""
  order = _order(match, n)
  return merged if order is None else merged[:, order]


def arrange_index(new_index: jax.Array, match: ToMeMatch) -> jax.Array:
  """A new_index (B, N) into [unmerged A, B] -> into `arrange`'s order (-1 stays -1)."""
  order = _order(match, new_index.shape[1])
  if order is None:
    return new_index
  inverse = jnp.asarray(np.argsort(order).astype(np.int32))
  return jnp.where(new_index >= 0, inverse[jnp.maximum(new_index, 0)], new_index)


def merge_sum(x: jax.Array, match: ToMeMatch) -> jax.Array:
  """Applies a match by summing: x (B, N, C) -> (B, N - r, C), [unmerged A, B] (the protected
  tokens first where more than one: `arrange`).

  Accumulates in float32 and returns `x`'s dtype.
  """
  b, n, c = validate.check_rank("x", x, 3, "(B, N, C)")
  a_tokens = upcast(x[:, ::2])
  b_tokens = upcast(x[:, 1::2])
  if match.unmerged.shape[1] + match.src.shape[1] != a_tokens.shape[1]:
    raise ValueError(
        f"the match was made for a different token count than x {x.shape}: it "
        f"covers {match.unmerged.shape[1] + match.src.shape[1]} A tokens, x has "
        f"{a_tokens.shape[1]}.")
  take = lambda idx: jnp.take_along_axis(a_tokens, idx[..., None], axis=1)
  onehot = jax.nn.one_hot(match.dst, b_tokens.shape[1], dtype=b_tokens.dtype)  # (B, r, Nb)
  b_tokens = b_tokens + jnp.einsum("brn,brc->bnc", onehot, take(match.src))
  return arrange(jnp.concatenate([take(match.unmerged), b_tokens], axis=1), match,
                 n).astype(x.dtype)


def merge_wavg(x: jax.Array, size: jax.Array | None,
               match: ToMeMatch) -> tuple[jax.Array, jax.Array]:
  """Size-weighted average merge.

  x (B, N, C), size (B, N) token sizes (None means all 1) ->
  (x (B, N - r, C), size (B, N - r)). The total size is preserved.
  """
  b, n, _ = validate.check_rank("x", x, 3, "(B, N, C)")
  if size is None:
    size = jnp.ones((b, n), jnp.float32)
  if tuple(size.shape) != (b, n):
    raise ValueError(f"size must have shape (B, N)={(b, n)} to match x, got {size.shape}.")
  size = upcast(size)
  both = jnp.concatenate([upcast(x) * size[..., None], size[..., None]], -1)
  merged = merge_sum(both, match)
  new_size = merged[..., -1]
  return (merged[..., :-1] / new_size[..., None]).astype(x.dtype), new_size


def proportional_attention_bias(size: jax.Array) -> jax.Array:
  """`log(size)` broadcast over heads and queries: (B, N) -> (B, 1, 1, N) float32.

  Added to the attention logits so a merged token counts as many.
  """
  validate.check_rank("size", size, 2, "(B, N)")
  return jnp.log(upcast(size))[:, None, None, :]
