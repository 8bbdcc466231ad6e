"""Attention-side operators: policy softmax (dTPS training) and class-attention scores (eTPS).

SPEC section 2.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast

POLICY_EPS = 1e-6


def policy_softmax(logits: jax.Array, policy, eps: float = POLICY_EPS) -> jax.Array:
  """Softmax over keys that ignores tokens the policy has dropped.

  Args:
    logits: (B, H, N, N) attention logits, queries by keys.
    policy: (B, N) or (B, N, 1), 1 for live tokens (may be a straight-through
      float mask). A dropped token still attends to itself, so no row is empty.
    eps: the authors' smoothing.

  Returns:
    (B, H, N, N) attention weights in `logits`' dtype, computed in float32:
    `(exp(a - max a) * P + eps / N) / (sum exp(a - max a) * P + eps)` with
    `P[i, j] = pi_j + (1 - pi_j) [i = j]`.
  """
  b, _, n, nk = validate.check_rank("logits", logits, 4, "(B, H, N, N)")
  if n != nk:
    raise ValueError(f"logits must be square over tokens (B, H, N, N), got {logits.shape}.")
  pi = validate.token_mask("policy", policy, b, n)
  a = upcast(logits)
  pi = pi.astype(a.dtype)[:, None, None, :]  # (B, 1, 1, N)
  eye = jnp.eye(n, dtype=a.dtype)[None, None]
  allowed = pi + (1.0 - pi) * eye  # (B, 1, N, N)
  a = jnp.exp(a - jnp.max(a, axis=-1, keepdims=True)) * allowed
  attn = (a + eps / n) / (jnp.sum(a, axis=-1, keepdims=True) + eps)
  return attn.astype(logits.dtype)


def class_attention_scores(attn: jax.Array, num_prefix: int = 1) -> jax.Array:
  """Importance of each patch token: mean over heads of the attention from cls.

  attn (B, H, N, N) softmax weights with cls at index 0 and `num_prefix`
  non-patch tokens first -> (B, N - num_prefix) float32.
  """
  _, _, n, nk = validate.check_rank("attn", attn, 4, "(B, H, N, N)")
  if n != nk:
    raise ValueError(f"attn must be square over tokens (B, H, N, N), got {attn.shape}.")
  validate.check_count("num_prefix", num_prefix, 1, n, f"attn of shape {attn.shape}")
  return jnp.mean(upcast(attn[:, :, 0, num_prefix:]), axis=1)
