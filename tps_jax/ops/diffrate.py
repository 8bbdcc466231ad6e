"""DiffRate's merge (Chen et al., ICCV 2023), with static shapes.

After a block's attention the tokens are sorted by importance (cls attention) and the
first `merge_k` kept; each of the next ones (up to the pruning count; the rest are pruned)
merges into its most similar kept token (cosine of the tokens themselves, cls never a
host). As the authors' `DiffRate/merge.py` and DeiT patch do it:

  x_host    <- (x_host + sum of its merged tokens) / (1 + their number)   an unweighted mean
  size_host <- size_host + sum of (size x similarity to the host) of its merged tokens

the size feeding the proportional attention (log size) of the blocks after.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast
from tps_jax.ops.merge import normalize


def diffrate_merge(kept: jax.Array, src: jax.Array, kept_size: jax.Array, src_size: jax.Array,
                   protected: int = 1) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Merges each `src` token into its most similar `kept` token.

  kept (B, K, C) with the `protected` tokens first (never hosts), src (B, U, C), sizes (B, K)
  and (B, U) -> (kept (B, K, C) in kept's dtype, size (B, K) float32, host (B, U) int32 index
  into kept). No gradient flows through the choice of hosts.
  """
  b, k, c = validate.check_rank("kept", kept, 3, "(B, K, C)")
  _, u, _ = validate.check_rank("src", src, 3, "(B, U, C)")
  if k <= protected:
    raise ValueError(f"diffrate_merge needs a kept token besides the {protected} protected, "
                     f"got K={k}.")
  a, h = (normalize(upcast(jax.lax.stop_gradient(t))) for t in (src, kept))
  sim = jnp.einsum("buc,bkc->buk", a, h)
  if protected:
    sim = sim.at[:, :, :protected].set(-jnp.inf)
  node_max = jnp.max(sim, axis=-1)
  host = jnp.argmax(sim, axis=-1).astype(jnp.int32)
  onehot = jax.nn.one_hot(host, k, dtype=jnp.float32)  # (B, U, K)
  count = 1.0 + jnp.sum(onehot, axis=1)
  merged = (upcast(kept) + jnp.einsum("buk,buc->bkc", onehot, upcast(src))) / count[..., None]
  size = upcast(kept_size) + jnp.einsum("buk,bu->bk", onehot, upcast(src_size) * node_max)
  return merged.astype(kept.dtype), size, host


# The search's differentiable kept counts (the authors' training forward), pure functions of
# a block's logits over candidate counts. The search itself runs through the model's encoder
# (method "diffrate_search", tps_jax.trainer.rate_search).

def ste(value: jax.Array, grad_of: jax.Array) -> jax.Array:
  """`value` forward, the gradient of `grad_of` backward."""
  return grad_of + jax.lax.stop_gradient(value - grad_of)


def rate_candidates(num_patches: int, block: int) -> jax.Array:
  """Kept-count candidates of a block (patch tokens): N0..1, block 0 only N0 (the authors')."""
  return jnp.arange(num_patches, 0, -1, dtype=jnp.float32) if block else \
      jnp.asarray([num_patches], jnp.float32)


def kept_number(logits: jax.Array, cands: jax.Array) -> jax.Array:
  """ceil(E[candidate]) + 1 (cls), straight-through: the gradient of the expectation."""
  e = jnp.dot(cands, jax.nn.softmax(logits))
  return ste(jnp.ceil(e), e) + 1.0


def token_mask(logits: jax.Array, cands: jax.Array, kept: jax.Array, upto: jax.Array,
               t: int) -> jax.Array:
  """(T,) 0 on [kept, upto), else 1, with the gradient of P(kept >= j + 1) (the authors')."""
  prob = jax.nn.softmax(logits)
  j = jnp.arange(t, dtype=jnp.float32)
  token_prob = jnp.sum(prob[:, None] * (j[None, :] < cands[:, None] + 1.0), axis=0)
  hard = 1.0 - ((j >= jnp.floor(kept)) & (j < upto)).astype(jnp.float32)
  return ste(hard, token_prob)


def ste_min(n, a, b):
  """min(n, a, b) forward; backward the whole gradient to a and to b, none to n (theirs)."""
  return ste(jnp.minimum(jnp.minimum(n, a), b), a + b)
