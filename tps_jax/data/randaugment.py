"""RandAugment (Cubuk et al. 2020) as DeiT uses it: timm's `rand-m9-mstd0.5-inc1`.

Every op is a TensorFlow graph op on one uint8 image (H, W, C) and draws its
randomness from stateless seeds, so an augmented example is a pure function of
(seed, image). The op set and magnitude mappings follow timm's "increasing"
variant: a larger magnitude is always a stronger distortion.

  rand_augment(image, seed, num_layers=2, magnitude=9, magnitude_std=0.5)

applies `num_layers` ops drawn uniformly with replacement, each with
probability 0.5, at a magnitude drawn from N(magnitude, magnitude_std) clipped
to [0, 10].
"""

from __future__ import annotations

import math

import tensorflow as tf

MAX_LEVEL = 10.0
FILL = 128  # grey fill for pixels that geometric ops bring in from outside


def _blend(degenerate, image, factor):
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped."""
  d, x = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
  return tf.cast(tf.clip_by_value(d + factor * (x - d), 0.0, 255.0), tf.uint8)


def _grey(image):
  """Luma as PIL's convert("L"), broadcast back to the image's channels."""
  x = tf.cast(image, tf.float32)
  if image.shape[-1] == 1:
    return image
  y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  y = tf.cast(tf.clip_by_value(tf.round(y), 0, 255), tf.uint8)
  return tf.repeat(y[..., None], image.shape[-1], axis=-1)


def _signed(value, seed):
  """`value` with a random sign (timm's _randomly_negate)."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.where(flip, -value, value)


def _affine(image, matrix):
  """Applies the 2x3 inverse map `matrix` (output pixel -> input pixel)."""
  transform = tf.concat([tf.reshape(matrix, [6]), tf.zeros([2])], axis=0)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(transform, tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=float(FILL),
      interpolation="BILINEAR", fill_mode="CONSTANT")
  return out[0]


# Each op: (image uint8 (H, W, C), level in [0, 10], seed) -> uint8 (H, W, C).

def identity(image, level, seed):
  del level, seed
  return image


def auto_contrast(image, level, seed):
  del level, seed
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  offset = tf.where(hi > lo, lo, 0.0)
  return tf.cast(tf.clip_by_value((x - offset) * scale, 0, 255), tf.uint8)


def _equalize_channel(channel):
  """PIL's ImageOps.equalize on one uint8 channel (H, W)."""
  hist = tf.histogram_fixed_width(tf.cast(channel, tf.int32), [0, 255], nbins=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  last = tf.cond(tf.size(nonzero) > 0, lambda: nonzero[-1], lambda: tf.constant(0))
  step = (tf.reduce_sum(hist) - last) // 255

  def lut():
    table = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
    return tf.gather(tf.clip_by_value(table, 0, 255), tf.cast(channel, tf.int32))

  return tf.cast(tf.cond(step > 0, lut, lambda: tf.cast(channel, tf.int32)), tf.uint8)


def equalize(image, level, seed):
  del level, seed
  return tf.stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], -1)


def invert(image, level, seed):
  del level, seed
  return 255 - image


def rotate(image, level, seed):
  degrees = _signed(level / MAX_LEVEL * 30.0, seed)
  theta = degrees * math.pi / 180.0  # counter-clockwise, as PIL's rotate
  h, w = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
  cx, cy = (w - 1) / 2, (h - 1) / 2
  c, s = tf.cos(theta), tf.sin(theta)
  matrix = tf.stack([c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy])
  return _affine(image, matrix)


def posterize(image, level, seed):
  del seed
  bits = 4 - tf.cast(level / MAX_LEVEL * 4, tf.int32)  # timm's increasing mapping
  shift = tf.cast(8 - tf.clip_by_value(bits, 0, 8), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, level, seed):
  del seed
  threshold = 256 - tf.cast(level / MAX_LEVEL * 256, tf.int32)
  return tf.where(tf.cast(image, tf.int32) >= threshold, 255 - image, image)


def solarize_add(image, level, seed):
  del seed
  add = tf.cast(level / MAX_LEVEL * 110, tf.int32)
  x = tf.cast(image, tf.int32)
  return tf.cast(tf.where(x < 128, tf.minimum(x + add, 255), x), tf.uint8)


def _enhance_factor(level, seed):
  return 1.0 + _signed(level / MAX_LEVEL * 0.9, seed)


def color(image, level, seed):
  return _blend(_grey(image), image, _enhance_factor(level, seed))


def contrast(image, level, seed):
  mean = tf.reduce_mean(tf.cast(_grey(image)[..., 0], tf.float32))
  return _blend(tf.fill(tf.shape(image), tf.round(mean)), image, _enhance_factor(level, seed))


def brightness(image, level, seed):
  return _blend(tf.zeros_like(image), image, _enhance_factor(level, seed))


def sharpness(image, level, seed):
  """Blends with PIL's SMOOTH filter (borders kept as they are)."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0, 255)
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  inner = tf.pad(tf.ones_like(smooth[1:-1, 1:-1, :1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = inner * smooth + (1 - inner) * tf.cast(image, tf.float32)
  return _blend(degenerate, image, _enhance_factor(level, seed))


def shear_x(image, level, seed):
  k = _signed(level / MAX_LEVEL * 0.3, seed)
  return _affine(image, tf.stack([1.0, k, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image, level, seed):
  k = _signed(level / MAX_LEVEL * 0.3, seed)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, k, 1.0, 0.0]))


def translate_x(image, level, seed):
  dx = _signed(level / MAX_LEVEL * 0.45, seed) * tf.cast(tf.shape(image)[1], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, dx, 0.0, 1.0, 0.0]))


def translate_y(image, level, seed):
  dy = _signed(level / MAX_LEVEL * 0.45, seed) * tf.cast(tf.shape(image)[0], tf.float32)
  return _affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, dy]))


# timm's _RAND_INCREASING_TRANSFORMS, in its order.
OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Rotate": rotate, "Posterize": posterize, "Solarize": solarize,
    "SolarizeAdd": solarize_add, "Color": color, "Contrast": contrast,
    "Brightness": brightness, "Sharpness": sharpness, "ShearX": shear_x,
    "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y,
}


def rand_augment(image, seed, *, num_layers: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, ops=tuple(OPS)):
  """Applies `num_layers` random ops to a uint8 image (H, W, C); `seed` is int (2,)."""
  if image.dtype != tf.uint8:
    raise ValueError(f"rand_augment expects a uint8 image, got {image.dtype}.")
  unknown = [o for o in ops if o not in OPS]
  if unknown:
    raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}.")
  if not 0 <= magnitude <= MAX_LEVEL:
    raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL}], got {magnitude}.")
  branches = [OPS[o] for o in ops]
  seeds = tf.random.experimental.stateless_split(seed, num=4 * num_layers)
  for layer in range(num_layers):
    s_op, s_apply, s_level, s_sign = (seeds[4 * layer + i] for i in range(4))
    index = tf.random.stateless_uniform([], s_op, 0, len(branches), dtype=tf.int32)
    level = magnitude + magnitude_std * tf.random.stateless_normal([], s_level)
    level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
    apply = tf.random.stateless_uniform([], s_apply) < prob
    fns = [lambda f=f: f(image, level, s_sign) for f in branches]
    augmented = tf.switch_case(index, fns)
    image = tf.ensure_shape(tf.where(apply, augmented, image), image.shape)
  return image
