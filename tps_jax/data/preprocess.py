"""Per-example image processing in TensorFlow: DeiT's train and eval transforms.

  train: decode (+ random resized crop) -> flip -> RandAugment -> normalise
         -> random erasing
  eval:  decode -> resize the short side to size / crop_pct -> centre crop
         -> normalise

Every random choice comes from a stateless seed, so an example's augmentation
is a pure function of (seed, example) whatever tf.data's parallelism.
Mixup / CutMix and label smoothing act on whole batches on the device
(`tps_jax.data.mixing`).
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

from tps_jax.data import randaugment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("random_resized", "pad_random", "none")


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How images become model inputs (H = W = `size`, `channels` channels).

  crop: "random_resized" (DeiT: scale `crop_scale`, ratio `crop_ratio`),
    "pad_random" (pad `pad` pixels, take a random `size` crop: the small-image
    recipe), or "none" (resize to `size`).
  randaugment: (num_layers, magnitude) or None; `randaugment_std` is the
    magnitude noise (timm's mstd).
  erasing: probability of random erasing (timm's mode "pixel"), 0 to disable.
  crop_pct: eval resizes the short side to size / crop_pct, then centre-crops.
  """
  size: int = 224
  channels: int = 3
  crop: str = "random_resized"
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  pad: int = 4
  flip: bool = True
  randaugment: tuple[int, float] | None = (2, 9.0)
  randaugment_std: float = 0.5
  erasing: float = 0.25
  crop_pct: float = 0.875
  mean: tuple[float, ...] = IMAGENET_MEAN
  std: tuple[float, ...] = IMAGENET_STD
  resize_method: str = "bicubic"

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"unknown crop {self.crop!r}; expected one of {CROPS}.")
    if self.channels not in (1, 3):
      raise ValueError(f"channels must be 1 or 3, got {self.channels}.")
    for name in ("mean", "std"):
      if len(getattr(self, name)) not in (1, self.channels):
        raise ValueError(f"{name} has {len(getattr(self, name))} values for "
                         f"{self.channels} channels.")
    if not 0 < self.crop_pct <= 1:
      raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}.")
    if not 0 <= self.erasing <= 1:
      raise ValueError(f"erasing is a probability, got {self.erasing}.")


def _to_channels(image, channels):
  """uint8 (H, W, 1 or 3) -> (H, W, channels): grey expanded, colour to luma."""
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1:
    return tf.image.grayscale_to_rgb(image)
  return tf.cast(tf.round(tf.image.rgb_to_grayscale(tf.cast(image, tf.float32))), tf.uint8)


def _resize(image, size_hw, method):
  out = tf.image.resize(image, size_hw, method=method, antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)


def _random_resized_crop(image, seed, p: Preprocess):
  begin, extent, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.shape(image), tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=p.crop_ratio, area_range=p.crop_scale,
      max_attempts=10, use_image_if_no_bounding_boxes=True)
  crop = tf.slice(image, begin, extent)
  return _resize(crop, (p.size, p.size), p.resize_method)


def _pad_random_crop(image, seed, p: Preprocess):
  image = _resize(image, (p.size, p.size), p.resize_method) if image.shape[0] != p.size else image
  padded = tf.pad(image, [[p.pad, p.pad], [p.pad, p.pad], [0, 0]])
  return tf.image.stateless_random_crop(padded, (p.size, p.size, image.shape[-1]), seed)


def normalise(image, p: Preprocess):
  x = tf.cast(image, tf.float32) / 255.0
  return (x - tf.constant(p.mean, tf.float32)) / tf.constant(p.std, tf.float32)


def random_erasing(x, seed, prob: float):
  """timm's RandomErasing(mode="pixel", max_count=1) on a normalised image.

  One box of area in [2%, 1/3] of the image and log-uniform aspect ratio in
  [0.3, 3.3] is filled with N(0, 1) noise. timm retries up to 10 times for a
  box that fits; here the box is clipped to the image instead, so the shapes
  stay static.
  """
  s_apply, s_area, s_ratio, s_y, s_x, s_noise = tf.unstack(
      tf.random.experimental.stateless_split(seed, 6))
  h, w = x.shape[0], x.shape[1]
  area = tf.random.stateless_uniform([], s_area, 0.02, 1 / 3) * h * w
  ratio = tf.exp(tf.random.stateless_uniform([], s_ratio, tf.math.log(0.3), tf.math.log(3.3)))
  bh = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area * ratio)), tf.int32), 1, h)
  bw = tf.clip_by_value(tf.cast(tf.round(tf.sqrt(area / ratio)), tf.int32), 1, w)
  top = tf.random.stateless_uniform([], s_y, 0, h - bh + 1, dtype=tf.int32)
  left = tf.random.stateless_uniform([], s_x, 0, w - bw + 1, dtype=tf.int32)
  rows, cols = tf.range(h)[:, None, None], tf.range(w)[None, :, None]
  box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
  box &= tf.random.stateless_uniform([], s_apply) < prob
  return tf.where(box, tf.random.stateless_normal(x.shape, s_noise), x)


def train_image(image, seed, p: Preprocess):
  """uint8 (H, W, C) and an int (2,) seed -> float32 (size, size, channels)."""
  s_crop, s_flip, s_aug, s_erase = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
  image = _to_channels(image, p.channels)
  if p.crop == "random_resized":
    image = _random_resized_crop(image, s_crop, p)
  elif p.crop == "pad_random":
    image = _pad_random_crop(image, s_crop, p)
  else:
    image = _resize(image, (p.size, p.size), p.resize_method)
  image = tf.ensure_shape(image, (p.size, p.size, p.channels))
  if p.flip:
    image = tf.image.stateless_random_flip_left_right(image, s_flip)
  if p.randaugment:
    layers, magnitude = p.randaugment
    image = randaugment.rand_augment(image, s_aug, num_layers=int(layers),
                                     magnitude=float(magnitude),
                                     magnitude_std=p.randaugment_std)
  x = normalise(image, p)
  if p.erasing > 0:
    x = random_erasing(x, s_erase, p.erasing)
  return x


def eval_image(image, p: Preprocess):
  """uint8 (H, W, C) -> float32 (size, size, channels): resize + centre crop."""
  image = _to_channels(image, p.channels)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = (p.size / p.crop_pct) / tf.reduce_min(shape)
  new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), p.size)
  if p.crop_pct == 1.0 and image.shape[0] == image.shape[1] == p.size:
    resized = image
  else:
    resized = _resize(image, new, p.resize_method)
  top, left = (new[0] - p.size) // 2, (new[1] - p.size) // 2
  image = tf.slice(resized, [top, left, 0], [p.size, p.size, p.channels])
  return normalise(tf.ensure_shape(image, (p.size, p.size, p.channels)), p)
