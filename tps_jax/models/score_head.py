"""DynamicViT's token score head (used by dTPS and DynamicViT)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tps_jax.models.layers import gelu
from tps_jax.ops.dtypes import upcast


class ScoreHead(nn.Module):
  """Keep / drop log-probabilities of each patch token (docs/method.md, section 2).

  `h = GELU(Dense_C(LN(x)))`; local half of `h` per token, global half averaged
  over live tokens; then Dense C/2 -> GELU -> Dense C/4 -> GELU -> Dense 2 ->
  log-softmax. Channel 0 is "keep". Parameter names map the authors'
  `score_predictor.{s}.in_conv.{0,1}` / `out_conv.{0,2,4}` in that order.
  """
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, live: jax.Array) -> jax.Array:
    """x (B, N, C) patch tokens, live (B, N) 0/1 -> (B, N, 2) float32 log-probabilities."""
    c = x.shape[-1]
    h = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm_0")(x)
    h = gelu(nn.Dense(c, dtype=self.dtype, name="Dense_0")(h))
    local, glob = h[..., : c // 2], h[..., c // 2:]
    w = upcast(live)[..., None]  # (B, N, 1)
    glob = jnp.sum(upcast(glob) * w, axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(w, axis=1, keepdims=True), 1e-6)
    h = jnp.concatenate([local, jnp.broadcast_to(glob.astype(h.dtype), local.shape[:2] + glob.shape[2:])], -1)
    h = gelu(nn.Dense(c // 2, dtype=self.dtype, name="Dense_1")(h))
    h = gelu(nn.Dense(c // 4, dtype=self.dtype, name="Dense_2")(h))
    h = nn.Dense(2, dtype=self.dtype, name="Dense_3")(h)
    return jax.nn.log_softmax(upcast(h), axis=-1)
