"""Device side of DeiT's transforms, in jnp, inside the jitted step.

The host sends uint8 batches (a quarter of float32's bytes); here they become
model inputs:

  train_images(key, images, preprocess)   RandAugment -> normalise -> random erasing
  eval_images(images, preprocess)         normalise

`key` is the step's key; example b uses `fold_in(key, b)`, b its row in the
global batch, so the augmentation is a pure function of (seed, step,
position), whatever the mesh, and a resumed run repeats it exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.data import randaugment
from tps_jax.data.preprocess import Preprocess


def normalise(images: jax.Array, p: Preprocess) -> jax.Array:
  """uint8 (..., C) -> float32 ((x / 255 - mean) / std)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(p.mean, jnp.float32)) / jnp.asarray(p.std, jnp.float32)


def random_erasing(key: jax.Array, x: jax.Array, prob: float) -> jax.Array:
  """timm's RandomErasing(mode="pixel", max_count=1) on one normalised image (H, W, C).

  One box of area in [2%, 1/3] of the image and log-uniform aspect ratio in
  [0.3, 3.3] is filled with N(0, 1) noise. timm retries up to 10 times for a
  box that fits; here the box is clipped to the image instead, so the shapes
  stay static.
  """
  k_apply, k_area, k_ratio, k_y, k_x, k_noise = jax.random.split(key, 6)
  h, w, _ = x.shape
  area = jax.random.uniform(k_area, (), minval=0.02, maxval=1 / 3) * h * w
  ratio = jnp.exp(jax.random.uniform(k_ratio, (), minval=jnp.log(0.3), maxval=jnp.log(3.3)))
  bh = jnp.clip(jnp.round(jnp.sqrt(area * ratio)), 1, h).astype(jnp.int32)
  bw = jnp.clip(jnp.round(jnp.sqrt(area / ratio)), 1, w).astype(jnp.int32)
  top = jax.random.randint(k_y, (), 0, h - bh + 1)
  left = jax.random.randint(k_x, (), 0, w - bw + 1)
  rows, cols = jnp.arange(h)[:, None, None], jnp.arange(w)[None, :, None]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  box &= jax.random.uniform(k_apply) < prob
  return jnp.where(box, jax.random.normal(k_noise, x.shape, x.dtype), x)


def train_images(key: jax.Array, images: jax.Array, p: Preprocess) -> jax.Array:
  """uint8 (B, S, S, C) -> float32 (B, S, S, C), augmented per example."""
  if images.ndim != 4 or images.shape[-1] != p.channels:
    raise ValueError(f"train_images expects (B, H, W, {p.channels}) images, got "
                     f"{images.shape}.")
  keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(images.shape[0]))
  x = images.astype(jnp.float32)
  if p.randaugment and p.randaugment[0] > 0:
    layers, magnitude = p.randaugment

    def one(k, image):
      return randaugment.rand_augment(jax.random.fold_in(k, 0), image, num_layers=int(layers),
                                      magnitude=float(magnitude),
                                      magnitude_std=p.randaugment_std,
                                      interpolation=p.randaugment_interpolation, fill=p.fill)

    x = jax.vmap(one)(keys, x)
  x = normalise(x, p)
  if p.erasing > 0:
    erase = lambda k, image: random_erasing(jax.random.fold_in(k, 1), image, p.erasing)
    x = jax.vmap(erase)(keys, x)
  return x


def eval_images(images: jax.Array, p: Preprocess) -> jax.Array:
  """uint8 (B, S, S, C) -> float32, normalised."""
  return normalise(images, p)
