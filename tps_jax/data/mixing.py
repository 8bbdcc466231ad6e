"""Mixup / CutMix and label smoothing on the device (pure jnp, jit-friendly).

timm's batch mode as DeiT uses it (mixup 0.8, cutmix 1.0, switch prob 0.5,
smoothing 0.1): one mixing coefficient per batch, each image mixed with the
image at the mirrored batch position, soft targets mixed with the same weight.
`mix_per_shard` does this on each device's shard of a sharded batch, as timm's
Mixup runs on each GPU's batch: its own coefficient and box, pairs that never
cross devices, so the step moves no image between devices (a mirror of the
global batch is a collective permute of the whole float32 batch every step).
Shapes are static: the CutMix box is a mask built from iota comparisons.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class Mixing:
  mixup_alpha: float = 0.8
  cutmix_alpha: float = 1.0
  switch_prob: float = 0.5  # P(CutMix) when both are on
  prob: float = 1.0  # P(mixing a batch at all)
  smoothing: float = 0.1

  def __post_init__(self):
    if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
      raise ValueError("mixup_alpha and cutmix_alpha must be >= 0.")
    for name in ("switch_prob", "prob", "smoothing"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")

  @property
  def active(self) -> bool:
    return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def cutmix_box(rng: jax.Array, height: int, width: int, lam: jax.Array):
  """timm's rand_bbox: a box of sides sqrt(1 - lam) * (H, W), clipped; mask (H, W), area."""
  cut = jnp.sqrt(1.0 - lam)
  ch, cw = (cut * height).astype(jnp.int32), (cut * width).astype(jnp.int32)
  ky, kx = jax.random.split(rng)
  cy = jax.random.randint(ky, (), 0, height)
  cx = jax.random.randint(kx, (), 0, width)
  y0, y1 = jnp.clip(cy - ch // 2, 0, height), jnp.clip(cy + ch // 2, 0, height)
  x0, x1 = jnp.clip(cx - cw // 2, 0, width), jnp.clip(cx + cw // 2, 0, width)
  rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
  mask = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
  return mask, (y1 - y0) * (x1 - x0)


def mix(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
        config: Mixing = Mixing()):
  """images (B, H, W, C), int labels (B,) -> mixed images, soft targets (B, K) summing to 1."""
  # timm's smoothing: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere.
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), config.smoothing)
  if not config.active:
    return images, targets
  k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
  _, height, width, _ = images.shape
  use_cutmix = config.cutmix_alpha > 0 and (
      config.mixup_alpha == 0 or jax.random.uniform(k_switch) < config.switch_prob)
  lam_mixup = (jax.random.beta(k_mixup, config.mixup_alpha, config.mixup_alpha)
               if config.mixup_alpha > 0 else 1.0)
  lam_cutmix = (jax.random.beta(k_cutmix, config.cutmix_alpha, config.cutmix_alpha)
                if config.cutmix_alpha > 0 else 1.0)
  box, area = cutmix_box(k_box, height, width, lam_cutmix)
  apply = jax.random.uniform(k_apply) < config.prob
  partner = images[::-1]
  mixed_up = lam_mixup * images + (1.0 - lam_mixup) * partner
  cut = jnp.where(box[None, :, :, None], partner, images)
  lam = jnp.where(use_cutmix, 1.0 - area / (height * width), lam_mixup)
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  images = jnp.where(apply, jnp.where(use_cutmix, cut, mixed_up), images).astype(images.dtype)
  return images, lam * targets + (1.0 - lam) * targets[::-1]


def mix_per_shard(rng: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
                  config: Mixing, sharding: jax.sharding.NamedSharding):
  """`mix` on each device's rows of a batch laid out by `sharding` (batch on axis 0).

  Each shard draws from `rng` folded with its position along the batch's mesh axes, so the
  result depends on the mesh's shape (as timm's does on the number of GPUs), never on timing.
  """
  spec = sharding.spec[0] if len(sharding.spec) else None
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  batch = jax.sharding.PartitionSpec(axes or None)

  def local(rng, images, labels):
    if axes:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
    return mix(rng, images, labels, num_classes, config)

  return jax.shard_map(local, mesh=sharding.mesh,
                       in_specs=(jax.sharding.PartitionSpec(), batch, batch),
                       out_specs=(batch, batch))(rng, images, labels)
