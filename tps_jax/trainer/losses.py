"""The fine-tuning objective of docs/method.md, section 9, as small pure functions.

  L = CE(soft targets) + keep_weight * keep-ratio loss
      + distill_weight * (KL(teacher || student) + token MSE)

Every term is a float32 scalar averaged over the batch. Cross-entropy and KL are Optax's
(`optax.losses`); the keep-ratio and token terms are TPS's own.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits (B, K), soft targets (B, K) summing to 1 -> mean_b -sum_k t log softmax."""
  return jnp.mean(optax.losses.softmax_cross_entropy(logits.astype(jnp.float32), targets))


def keep_ratio_loss(decisions: Sequence[jax.Array], ratios: Sequence[float]) -> jax.Array:
  """(1/S) sum_s mean_b (mean_i D_s[b, i] - rho_s)^2 over per-stage decisions (B, N0)."""
  if len(decisions) != len(ratios):
    raise ValueError(f"{len(decisions)} stages of decisions for {len(ratios)} keep ratios.")
  terms = [jnp.mean((jnp.mean(d.astype(jnp.float32), axis=-1) - r) ** 2)
           for d, r in zip(decisions, ratios)]
  return sum(terms) / len(terms)


def distill_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """KL(p_teacher || p_student), summed over classes, mean over the batch (T = 1)."""
  logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  logp_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
  return jnp.mean(optax.losses.kl_divergence_with_log_targets(logp_s, logp_t))


def token_mse(student: jax.Array, teacher: jax.Array, live: jax.Array) -> jax.Array:
  """Mean squared error over live tokens: student/teacher (B, N, D), live (B, N) 0/1."""
  live = live.astype(jnp.float32)
  err = jnp.sum((student.astype(jnp.float32) - teacher.astype(jnp.float32)) ** 2, axis=-1)
  return jnp.sum(err * live) / (jnp.maximum(jnp.sum(live), 1.0) * student.shape[-1])


def final_patch_tokens(out: dict, teacher_encoded: jax.Array, prefix: int = 1,
                       has_cls: bool = True):
  """Student final patch tokens, the teacher's at the same patches, and their live mask.

  Masked training path (dtps/dynamicvit): all N0 patches, live as decided.
  Gather path (etps/evit/topk): the k kept tokens, the teacher's gathered at
  their original positions; a token without a position (-1: EViT's fused
  token, wherever a later stage put it) is masked out and never gathered.
  ToMe: None (merged tokens have no single position).
  `prefix`: protected tokens leading both sequences (cls, pool "0"'s token 0; 0 for GAP /
  MAP models), left out; `has_cls`: the teacher's token 0 is cls, not patch 0.
  """
  encoded = out["encoded"]
  teacher_patches = teacher_encoded[:, int(has_cls):]  # indexed by patch position
  if out["keep_indices"]:
    positions = out["keep_indices"][-1]  # (B, k) original patch positions, -1 for none
    k = positions.shape[1]
    valid = positions >= 0
    safe = jnp.where(valid, positions, 0)[..., None]
    teacher_kept = jnp.take_along_axis(teacher_patches, safe, axis=1)
    return encoded[:, prefix:prefix + k], teacher_kept, valid.astype(jnp.float32)
  if "token_sizes" in out:
    return None
  return encoded[:, prefix:], teacher_encoded[:, prefix:], out["live_mask"][:, prefix:]


def objective(logits: jax.Array, out: dict, targets: jax.Array, *,
              keep_ratios: Sequence[float] = (), keep_weight: float = 0.0,
              teacher: tuple[jax.Array, jax.Array] | None = None,
              distill_weight: float = 0.0, token_distill: bool = True, prefix: int = 1,
              has_cls: bool = True):
  """Total loss and its terms. `teacher` is (logits (B, K), encoded (B, P + N0, D)) or None;
  `prefix` / `has_cls` as in `final_patch_tokens`."""
  terms = {"ce": soft_cross_entropy(logits, targets)}
  loss = terms["ce"]
  if keep_weight and out["decisions"] and keep_ratios:
    terms["keep"] = keep_ratio_loss(out["decisions"], keep_ratios)
    loss = loss + keep_weight * terms["keep"]
  if teacher is not None and distill_weight:
    t_logits, t_encoded = (jax.lax.stop_gradient(t) for t in teacher)
    terms["kl"] = distill_kl(logits, t_logits)
    loss = loss + distill_weight * terms["kl"]
    tokens = (final_patch_tokens(out, t_encoded, prefix, has_cls) if token_distill
              else None)
    if tokens is not None:
      terms["token"] = token_mse(*tokens)
      loss = loss + distill_weight * terms["token"]
  return loss, terms
