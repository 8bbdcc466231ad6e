"""Attention-side operators: policy attention (dTPS training) and class-attention scores (eTPS).

docs/method.md, section 2.
"""

from __future__ import annotations

import functools

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
#   exact      docs/method.md section 2 written out: float32 (B, H, N, N) weights, then weights @ v.
#   deferred   the same algebra with the normalisation after the matmul (flash attention's
#              order): exp(a - max) * P goes to the matmul unnormalised and the (B, H, N, d)
#              output is divided by the row sums. Exact up to rounding; one N x N pass fewer.
#   fused      the forward pass in one fused attention kernel (cuDNN's flash attention on a
#              GPU) with log P as an additive bias, and docs/method.md's gradients: q, k, v from the
#              kernel's backward pass, the policy's recomputed in float32 from the logits with
#              docs/method.md's row maximum and eps, so it equals the exact form's however far a
#              dropped key's logit rises (a custom VJP, below). Its forward pass leaves out
#              only the 1e-6 smoothing.
#   log_bias   the same forward pass with the policy gradient cut where it is 0: a dropped
#              token's policy gets no gradient through attention (d log P / dP at P = 0).
#              Cheapest; an approximation of the authors' training signal.
POLICY_FORMS = ("exact", "deferred", "fused", "log_bias")
_LOG_FLOOR = -1e4  # bias on a dropped key: exp(-1e4) is 0 in float32 and bfloat16


def attention_row(query: jax.Array, k: jax.Array, *, bias: jax.Array | None = None) -> jax.Array:
  """One query per head against every key: query (B, H, d) (unscaled), keys (B, N, H, d) ->
  its softmax attention row (B, H, N), float32 (a cls row, a mean query's, a MAP probe's);
  `bias` (B, 1|H, 1|N, N) adds its first query row."""
  logits = jnp.einsum("bhd,bkhd->bhk", query, k,
                      preferred_element_type=jnp.float32) * query.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + jnp.broadcast_to(bias, logits.shape[:1] + bias.shape[1:])[:, :, 0]
  return jax.nn.softmax(logits, axis=-1)


def _allowed(policy: jax.Array, n: int, dtype) -> jax.Array:
  """P (B, 1, N, N): P[i, j] = pi_j + (1 - pi_j) [i = j]; differentiable in pi."""
  pi = policy.astype(dtype)[:, None, None, :]
  return pi + (1.0 - pi) * jnp.eye(n, dtype=dtype)[None, None]


IMPLEMENTATIONS = ("xla", "cudnn")
CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # what cuDNN attention takes


def _check_cudnn(q: jax.Array) -> None:
  """cuDNN attention runs on a CUDA GPU in bfloat16 / float16: say so, not a lowering error."""
  if jax.default_backend() != "gpu":
    raise ValueError(f"cudnn attention needs a CUDA GPU, but JAX's backend is "
                     f"{jax.default_backend()!r}; use attention='auto'.")
  if jnp.dtype(q.dtype) not in CUDNN_DTYPES:
    raise ValueError(f"cudnn attention takes bfloat16 or float16, got {q.dtype}; use "
                     "attention='auto' (or mixed precision).")


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          bias: jax.Array | None = None, scale: float | None = None,
                          implementation: str = "xla", return_lse: bool = False):
  """`jax.nn.dot_product_attention` that takes any token count on cuDNN.

  q, k, v (B, N, H, d); bias broadcastable to (B, H, N, N) or None. "xla" is XLA's
  own composition; "cudnn" the flash kernel (GPU, bfloat16 / float16), which trains
  only over an even N: an odd N gets one zero token that no query sees (masked by
  the key length, or by a `_LOG_FLOOR` bias column), and its output row is dropped.
  Returns (B, N, H, d), and with `return_lse` also each row's log-sum-exp of the
  scaled, biased logits, (B, N, H) float32.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention implementation {implementation!r}; expected one of "
                     f"{IMPLEMENTATIONS}.")
  if implementation == "xla":
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla",
                                        return_residual=return_lse)
  _check_cudnn(q)
  b, n, _, _ = validate.check_rank("q", q, 4, "(B, N, H, d)")
  lengths = None
  if bias is not None:  # cuDNN wants the query and key axes written out
    bias = jnp.broadcast_to(bias, (bias.shape[0], bias.shape[1], n, n))
  if n % 2:
    q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
    if bias is None:
      lengths = jnp.full((b,), n, jnp.int32)
    else:
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 1), (0, 0)))
      bias = jnp.pad(bias, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=_LOG_FLOOR)
  out = jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale,
                                     key_value_seq_lengths=lengths, implementation="cudnn",
                                     return_residual=return_lse)
  if return_lse:
    return out[0][:, :n], out[1][:, :n].astype(jnp.float32)
  return out[:, :n]


def policy_attention(q: jax.Array, k: jax.Array, v: jax.Array, policy, *,
                     form: str = "exact", eps: float = POLICY_EPS,
                     implementation: str = "xla") -> jax.Array:
  """Self-attention in which tokens the policy dropped are invisible (docs/method.md, section 2).

  Args:
    q, k, v: (B, N, H, d) queries (already scaled), keys, values.
    policy: (B, N) or (B, N, 1) 0/1 live mask, a straight-through float mask in training.
    form: one of POLICY_FORMS (see above); "exact" and "deferred" give docs/method.md's values
      and gradients, "fused" the same up to the smoothing, "log_bias" an approximation.
    eps: the authors' smoothing (exact and deferred only).
    implementation: fused and log_bias only, "xla" or "cudnn" (see `dot_product_attention`).

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
    return dot_product_attention(q, k, v, bias=_log_policy_bias(pi, n, q.dtype), scale=1.0,
                                 implementation=implementation)
  if form == "fused":
    return _fused_policy_attention(q, k, v, pi, implementation)

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


def _log_policy_bias(pi: jax.Array, n: int, dtype) -> jax.Array:
  """log P (B, 1, N, N) in `dtype`, `_LOG_FLOOR` where P = 0 (no gradient there)."""
  allowed = _allowed(pi, n, jnp.float32)
  return jnp.where(allowed > 0, jnp.log(jnp.maximum(allowed, 1e-30)), _LOG_FLOOR).astype(dtype)


def _fused_policy_attention(q, k, v, pi, implementation):
  """The fused form: an odd N on cuDNN is padded once, here, with a dropped zero token (its
  key is visible only to its own query, whose row is sliced off), so the kernel never pads
  and the custom VJP's residuals hold one copy of q, k, v."""
  n = q.shape[1]
  if implementation == "cudnn" and n % 2:
    q, k, v = (jnp.pad(t, ((0, 0), (0, 1), (0, 0), (0, 0))) for t in (q, k, v))
    pi = jnp.pad(pi, ((0, 0), (0, 1)))
  return _fused_policy_core(q, k, v, pi, implementation, n)[:, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused_policy_core(q, k, v, pi, implementation, n):
  return _fused_policy_fwd(q, k, v, pi, implementation, n)[0]


def _fused_policy_fwd(q, k, v, pi, implementation, n):
  del n
  bias = jax.lax.stop_gradient(_log_policy_bias(pi, q.shape[1], q.dtype))
  attend = lambda q, k, v: dot_product_attention(q, k, v, bias=bias, scale=1.0,
                                                 implementation=implementation)
  y, attend_vjp = jax.vjp(attend, q, k, v)
  return y, (q, k, v, pi, y, attend_vjp)  # the kernel's residuals are these q, k, v: no copy


def _fused_policy_bwd(implementation, n, res, dy):
  """q, k, v: the kernel's backward pass (P fixed). The policy: the exact form's gradient,
  recomputed in float32 from the logits over the first `n` (real) tokens. With e = exp(a - m),
  m the row maximum over every key (dropped ones too, as in docs/method.md), S = sum_j e_ij P_ij and
  docs/method.md's eps, the exact form's weights are attn = (e P + eps / n) / (S + eps), so
  dL/dP_ij = e_ij / (S_i + eps) * (dy_i.v_j - dy_i.y_i) with y the smoothed output
  (S y_fused + eps / n sum_j v_j) / (S + eps). Each factor e / (S + eps) is at most 1 / eps,
  however far a dropped key's logit rises above the kept ones (the log-sum-exp of the kept
  keys alone would give exp(gap) there). P_ij = pi_j off the diagonal and 1 on it, so
  dL/dpi_j sums dL/dP_ij over queries i != j and heads."""
  del implementation
  q, k, v, pi, y, attend_vjp = res
  dq, dk, dv = attend_vjp(dy)
  full = q.shape[1]
  q, k, v, y, dy, p = (t[:, :n] for t in (q, k, v, y, dy, pi))
  a = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  e = jnp.exp(a - jnp.max(a, axis=-1, keepdims=True))
  s = jnp.sum(e * _allowed(p, n, e.dtype), axis=-1)  # (B, H, N)
  den = (s + POLICY_EPS).transpose(0, 2, 1)[..., None]  # (B, N, H, 1)
  y = (s.transpose(0, 2, 1)[..., None] * upcast(y)
       + (POLICY_EPS / n) * jnp.sum(upcast(v), axis=1, keepdims=True)) / den
  g = jnp.einsum("bqhd,bkhd->bhqk", dy, v, preferred_element_type=jnp.float32)
  dy_y = jnp.einsum("bqhd,bqhd->bhq", upcast(dy), y)
  w = e / den.transpose(0, 2, 1, 3) * (g - dy_y[..., None])
  dpi = jnp.sum(w * (1.0 - jnp.eye(n, dtype=w.dtype)), axis=(1, 2))  # (B, N)
  dpi = jnp.pad(dpi, ((0, 0), (0, full - n)))
  return dq, dk, dv, dpi.reshape(pi.shape).astype(pi.dtype)


_fused_policy_core.defvjp(_fused_policy_fwd, _fused_policy_bwd)




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
