"""Attention-side operators: policy attention (dTPS training) and class-attention scores (eTPS).

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
  a = jnp.exp(a - jnp.max(a, axis=-1, keepdims=True)) * _allowed(pi, n, a.dtype)
  attn = (a + eps / n) / (jnp.sum(a, axis=-1, keepdims=True) + eps)
  return attn.astype(logits.dtype)


# The forms `policy_attention` offers:
#   exact      the SPEC written out: float32 (B, H, N, N) weights, then weights @ v.
#   deferred   the same algebra with the normalisation after the matmul (flash attention's
#              order): exp(a - max) * P goes to the matmul unnormalised and the (B, H, N, d)
#              output is divided by the row sums. Exact up to rounding; one N x N pass fewer.
#   log_bias   jax.nn.dot_product_attention (cuDNN / flash kernels on GPU) with log P as an
#              additive bias. Not exact: it drops the 1e-6 smoothing, and a dropped token's
#              policy gets no gradient through attention (d log P / dP is cut at P = 0).
POLICY_FORMS = ("exact", "deferred", "log_bias")
_LOG_FLOOR = -1e4  # bias on a dropped key: exp(-1e4) is 0 in float32 and bfloat16


def _allowed(policy: jax.Array, n: int, dtype) -> jax.Array:
  """P (B, 1, N, N): P[i, j] = pi_j + (1 - pi_j) [i = j]; differentiable in pi."""
  pi = policy.astype(dtype)[:, None, None, :]
  return pi + (1.0 - pi) * jnp.eye(n, dtype=dtype)[None, None]


def policy_attention(q: jax.Array, k: jax.Array, v: jax.Array, policy, *,
                     form: str = "exact", eps: float = POLICY_EPS) -> jax.Array:
  """Self-attention in which tokens the policy dropped are invisible (SPEC 2, training).

  Args:
    q, k, v: (B, N, H, d) queries (already scaled), keys, values.
    policy: (B, N) or (B, N, 1) 0/1 live mask, a straight-through float mask in training.
    form: one of POLICY_FORMS (see above); "exact" and "deferred" give the SPEC's values
      and gradients, "log_bias" a fused-kernel approximation.
    eps: the authors' smoothing (exact and deferred only).

  Returns:
    (B, N, H, d) in v's dtype.
  """
  if form not in POLICY_FORMS:
    raise ValueError(f"unknown policy attention form {form!r}; expected one of {POLICY_FORMS}.")
  b, n, h, d = validate.check_rank("q", q, 4, "(B, N, H, d)")
  if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k, v must be (B, N, H, d) alike, got {q.shape}, {k.shape}, {v.shape}.")
  pi = validate.token_mask("policy", policy, b, n)

  if form == "log_bias":
    allowed = _allowed(pi, n, jnp.float32)
    bias = jnp.where(allowed > 0, jnp.log(jnp.maximum(allowed, 1e-30)), _LOG_FLOOR)
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), scale=1.0)

  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if form == "exact":
    attn = policy_softmax(logits, pi, eps).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", attn, v)
  # deferred: (sum_j w_ij v_j + eps / N sum_j v_j) / (sum_j w_ij + eps), w = exp(a - max) P.
  a = upcast(logits)
  w = jnp.exp(a - jnp.max(a, axis=-1, keepdims=True)) * _allowed(pi, n, a.dtype)
  den = jnp.sum(w, axis=-1) + eps  # (B, H, N)
  num = jnp.einsum("bhqk,bkhd->bqhd", w.astype(v.dtype), v, preferred_element_type=jnp.float32)
  num = num + (eps / n) * jnp.sum(upcast(v), axis=1, keepdims=True)
  return (num / den.transpose(0, 2, 1)[..., None]).astype(v.dtype)


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
