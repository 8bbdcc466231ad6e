"""AdamW with warm-up + cosine, the paper's backbone/score-head learning rates, no decay on
biases, norms, `pos_embedding` and `cls`; steps with non-finite gradients are skipped.

  tx, schedule = make_optimizer(params, total_steps=..., lr=..., ...)
"""

from __future__ import annotations

import re

import flax
import optax

SCORER = re.compile(r"(^|/)score_head_\d+/")
NO_DECAY_NAMES = ("pos_embedding", "cls")
# apply_if_finite applies non-finite updates after this many skipped steps in a row; the
# trainer stops long before (at its next log or checkpoint step), so it is never reached.
MAX_NONFINITE_STEPS = 2**30


def _tree_like(params, fn):
  """A tree shaped like `params` with fn("a/b/c", leaf) at each leaf."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return flax.traverse_util.unflatten_dict({k: fn(k, v) for k, v in flat.items()}, sep="/")


def decay_mask(params):
  """True where weight decay applies: matrices and kernels, not biases/norms/pos/cls."""
  # Leaves may be optax.MaskedNode (no ndim) inside multi_transform: no decay there.
  return _tree_like(params, lambda k, v: getattr(v, "ndim", 0) > 1
                    and k.split("/")[-1] not in NO_DECAY_NAMES)


def lr_groups(params):
  """'scorer' for score-head parameters, 'backbone' for the rest."""
  return _tree_like(params, lambda k, v: "scorer" if SCORER.search(k) else "backbone")


def schedule(*, lr: float, total_steps: int, warmup_steps: int, warmup_init_lr: float = 1e-6,
             min_lr: float = 1e-5):
  """Linear warm-up from warmup_init_lr to lr, then cosine to min_lr at total_steps."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}.")
  warmup_steps = max(min(warmup_steps, total_steps), 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=warmup_init_lr, peak_value=lr, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def make_optimizer(params, *, total_steps: int, lr: float, warmup_steps: int = 0,
                   warmup_init_lr: float = 1e-6, min_lr: float = 1e-5,
                   weight_decay: float = 0.05, backbone_lr_scale: float = 1.0,
                   clip_norm: float | None = None, b1: float = 0.9, b2: float = 0.999):
  """Returns (optax transform, lr schedule of the score heads / full-lr group)."""
  if lr <= 0:
    raise ValueError(f"lr must be > 0, got {lr}.")
  if not 0 < backbone_lr_scale <= 1:
    raise ValueError(f"backbone_lr_scale must be in (0, 1], got {backbone_lr_scale}.")
  sched = schedule(lr=lr, total_steps=total_steps, warmup_steps=warmup_steps,
                   warmup_init_lr=warmup_init_lr, min_lr=min_lr)
  adamw = lambda s: optax.adamw(s, b1=b1, b2=b2, weight_decay=weight_decay,
                                mask=decay_mask)
  tx = optax.multi_transform(
      {"backbone": adamw(lambda step: sched(step) * backbone_lr_scale),
       "scorer": adamw(sched)}, lr_groups)
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  # A step whose gradients are not finite leaves parameters and optimizer state as they were
  # (the trainer then stops at its next sync point with the last good checkpoint kept).
  tx = optax.apply_if_finite(tx, max_consecutive_errors=MAX_NONFINITE_STEPS)
  return tx, sched
