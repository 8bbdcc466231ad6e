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
