"""Pooling the final tokens into one vector, faithful after a reduction.

A token that absorbed others (squeezed, fused, merged) stands for several patches: its
`weight` is how many (ToMe's sizes), and 0 for a token a training policy dropped. With every
weight 1 both poolings are exactly the dense model's.

  weighted_mean(x, w)                 # GAP: sum_i w_i x_i / sum_i w_i
  MAPHead(...)(x, w)                  # big_vision's attention pooling, keys weighted by w
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tps_jax.models.layers import MlpBlock
from tps_jax.ops.dtypes import upcast

POOL_TYPES = ("tok", "gap", "map", "0", "none")


def weighted_mean(x: jax.Array, weight: jax.Array | None) -> jax.Array:
  """x (B, N, C), weight (B, N) or None (all 1) -> (B, C); float32 sums, x's dtype out."""
  if weight is None:
    return jnp.mean(x, axis=1)
  w = upcast(weight)[..., None]
  total = jnp.maximum(jnp.sum(w, axis=1), 1e-6)
  return (jnp.sum(upcast(x) * w, axis=1) / total).astype(x.dtype)


def weighted_softmax(logits: jax.Array, weight: jax.Array | None, eps: float = 0.0) -> jax.Array:
  """softmax(logits + log weight) over the last axis, as w exp(a) / sum w exp(a): tokens of
  weight 0 get none, and the weight (a straight-through policy) keeps its gradient, dropped
  tokens included. `eps` > 0 smooths as docs/method.md's policy attention does,
  (w exp(a) + eps / N) / (sum w exp(a) + eps), so a row whose tokens were all dropped in
  training stays finite (inference passes 0: exact).

  logits (..., N) float32, weight broadcastable to it or None.
  """
  if weight is None:
    return jax.nn.softmax(logits, axis=-1)
  w = jnp.broadcast_to(upcast(weight), logits.shape)
  top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = w * jnp.exp(logits - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  if eps:
    return (e + eps / logits.shape[-1]) / (total + eps)
  return e / total


class ProbeAttention(nn.Module):
  """Cross-attention of a few queries to weighted tokens, with flax's parameter layout
  (`query`/`key`/`value` kernels (D, H, D/H), `out` (H, D/H, D)).

  q_in (B, Q, D), kv_in (B, N, D), weight (B, N) or None -> (B, Q, D).
  """
  num_heads: int
  width: int
  dtype: Any = jnp.float32

  def setup(self):
    if self.width % self.num_heads:
      raise ValueError(f"MAP head: width {self.width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    hd = self.width // self.num_heads
    init = nn.initializers.xavier_uniform()
    dense = lambda name: nn.DenseGeneral((self.num_heads, hd), dtype=self.dtype,
                                         kernel_init=init, name=name)
    self.query, self.key, self.value = dense("query"), dense("key"), dense("value")
    self.out = nn.DenseGeneral(self.width, axis=(-2, -1), dtype=self.dtype, kernel_init=init,
                               name="out")

  def __call__(self, q_in, kv_in, weight=None, eps: float = 0.0):
    hd = self.width // self.num_heads
    q = self.query(q_in) * jnp.asarray(hd ** -0.5, self.dtype)  # (B, Q, H, hd)
    k, v = self.key(kv_in), self.value(kv_in)  # (B, N, H, hd)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    attn = weighted_softmax(logits, None if weight is None else weight[:, None, None, :], eps)
    y = jnp.einsum("bhqk,bkhd->bqhd", attn.astype(v.dtype), v)
    return self.out(y)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's `MAPHead`): a learned probe attends to the
  tokens, then a residual MLP; (B, N, D), weights (B, N) -> (B, D).

  Parameters as big_vision's: `probe` (1, 1, D), `MultiHeadDotProductAttention_0/{query,key,
  value,out}` laid out as flax's attention, `LayerNorm_0`, `MlpBlock_0/Dense_{0,1}`.
  `probe_query()` is the probe's query per head (H, D/H), unscaled: what the pooling looks
  for, which an attention stage may score tokens by before the last block (score
  "map_probe", docs/method.md section 3).
  """
  num_heads: int
  mlp_dim: int
  width: int
  dtype: Any = jnp.float32
  gelu: str = "tanh"  # big_vision's MlpBlock: flax's default GELU
  layer_norm_eps: float = 1e-6

  def setup(self):
    self.probe = self.param("probe", nn.initializers.xavier_uniform(), (1, 1, self.width))
    self.MultiHeadDotProductAttention_0 = ProbeAttention(
        self.num_heads, self.width, dtype=self.dtype, name="MultiHeadDotProductAttention_0")
    self.LayerNorm_0 = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                    name="LayerNorm_0")
    self.MlpBlock_0 = MlpBlock(self.mlp_dim, dtype=self.dtype, gelu=self.gelu,
                               name="MlpBlock_0")

  def probe_query(self) -> jax.Array:
    """(H, D/H) the probe's query projection (before the 1/sqrt(D/H) scale)."""
    return self.MultiHeadDotProductAttention_0.query(self.probe.astype(self.dtype))[0, 0]

  def __call__(self, x: jax.Array, weight: jax.Array | None = None,
               eps: float = 0.0) -> jax.Array:
    """x (B, N, D), weight (B, N) or None; `eps`: `weighted_softmax`'s (training policies)."""
    b, _, d = x.shape
    if d != self.width:
      raise ValueError(f"MAP head of width {self.width} got tokens of width {d}.")
    probe = jnp.broadcast_to(self.probe, (b, 1, d)).astype(x.dtype)
    x = self.MultiHeadDotProductAttention_0(probe, x, weight, eps)  # (B, 1, D)
    y = self.LayerNorm_0(x)
    x = x + self.MlpBlock_0(y)
    return x[:, 0]
