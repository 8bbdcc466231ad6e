"""RandAugment (Cubuk et al. 2020) as DeiT uses it (timm's `rand-m9-mstd0.5-inc1`), in jnp.

Runs on the device, inside the jitted train step: every op maps one image
(H, W, C) of float32 pixel values 0..255 (integers, as uint8) to another,
with static shapes, and draws its randomness from a JAX key, so an augmented
example is a pure function of (key, image). `jax.vmap` runs a batch with one
key per example. The op set and magnitude mappings follow timm's "increasing"
variant (a larger magnitude is always a stronger distortion), the pixel
arithmetic PIL's (what timm calls): truncation in blends, rounding in luma
and filters, pixel-centre sampling in affine warps.

  rand_augment(key, image, num_layers=2, magnitude=9, magnitude_std=0.5)

applies `num_layers` ops drawn uniformly with replacement, each with
probability 0.5, at a magnitude drawn from N(magnitude, magnitude_std) clipped
to [0, 10]. Geometric ops sample as timm asks PIL to for DeiT (bicubic,
PIL's cubic convolution with a = -1) and fill what they bring in from outside
with the mean colour (timm's `img_mean`: the normalisation mean x 255, rounded);
`interpolation="bilinear"` and `fill=128` give the simpler variant.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

MAX_LEVEL = 10.0
FILL = 128.0  # grey: the fill where no mean colour is given
INTERPOLATIONS = ("bicubic", "bilinear")


def _u8(x):
  """Clip to the uint8 range and truncate (PIL's cast of a float result)."""
  return jnp.floor(jnp.clip(x, 0.0, 255.0))


def _blend(degenerate, image, factor):
  """PIL's ImageEnhance: degenerate + factor * (image - degenerate), clipped, truncated."""
  return _u8(degenerate + factor * (image - degenerate))


def _luma(image):
  """PIL's convert("L"): rounded 0.299 R + 0.587 G + 0.114 B, as (H, W)."""
  if image.shape[-1] == 1:
    return image[..., 0]
  return jnp.round(0.299 * image[..., 0] + 0.587 * image[..., 1] + 0.114 * image[..., 2])


def _signed(value, key):
  """`value` with a random sign (timm's _randomly_negate)."""
  return jnp.where(jax.random.uniform(key) < 0.5, -value, value)


def _cubic_weights(d):
  """PIL's cubic convolution (Geometry.c, a = -1) at taps -1, 0, 1, 2 for fraction d: (..., 4)."""
  d2, d3 = d * d, d * d * d
  return jnp.stack([-d + 2 * d2 - d3, 1 - 2 * d2 + d3, d + d2 - d3, d3 - d2], axis=-1)


def affine(image, matrix, *, interpolation: str = "bicubic", fill=FILL):
  """PIL's Image.transform(AFFINE, matrix, BICUBIC or BILINEAR, fillcolor=fill).

  `matrix` (6,) maps an output pixel centre (x + 0.5, y + 0.5) to input
  coordinates (a x + b y + c, d x + e y + f); input points outside the image
  take `fill` (a value or one per channel), the rest are interpolated in the
  pixel grid with edge pixels repeated, as PIL does: bilinear rounded, bicubic
  truncated after clipping to 0..255.
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"unknown interpolation {interpolation!r}; expected one of "
                     f"{INTERPOLATIONS}.")
  h, w, _ = image.shape
  a, b, c, d, e, f = (matrix[i] for i in range(6))
  ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) + 0.5,
                        jnp.arange(w, dtype=jnp.float32) + 0.5, indexing="ij")
  xin, yin = a * xs + b * ys + c, d * xs + e * ys + f
  inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
  x, y = xin - 0.5, yin - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  dx, dy = x - x0, y - y0
  x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
  cx = lambda v: jnp.clip(v, 0, w - 1)
  cy = lambda v: jnp.clip(v, 0, h - 1)
  if interpolation == "bilinear":
    dx, dy = dx[..., None], dy[..., None]
    top = image[cy(y0i), cx(x0i)] * (1 - dx) + image[cy(y0i), cx(x0i + 1)] * dx
    bottom = image[cy(y0i + 1), cx(x0i)] * (1 - dx) + image[cy(y0i + 1), cx(x0i + 1)] * dx
    out = jnp.clip(jnp.round(top * (1 - dy) + bottom * dy), 0, 255)
  else:
    # Tap by tap on the channel planes (C, H, W): the 4 x 4 neighbourhood is never held at
    # once, and no array has a small minor dimension (which a TPU pads to its 128 lanes).
    planes = jnp.moveaxis(image, -1, 0)
    wy, wx = _cubic_weights(dy), _cubic_weights(dx)  # (H, W, 4)
    out = 0.0
    for i in range(4):
      row = 0.0
      for j in range(4):
        row = row + wx[..., j] * planes[:, cy(y0i + i - 1), cx(x0i + j - 1)]
      out = out + wy[..., i] * row
    out = jnp.moveaxis(out, 0, -1)
    # PIL truncates a double; a float32 sum that should be an integer k may come out as
    # k - 1e-5 (and differently in different compiled forms): truncate k - 1e-3 and up to k.
    out = jnp.floor(jnp.clip(out, 0, 255) + 1e-3)
  fill = jnp.broadcast_to(jnp.asarray(fill, image.dtype), image.shape[-1:])
  return jnp.where(inside[..., None], out, fill)


# Every op is one of three kinds, which `rand_augment` batches as three computations
# instead of fifteen (under vmap, a switch computes every branch for every image):
#   geometric  an affine warp; the op gives only its (6,) matrix from (height, width, level, key)
#   table      a per-channel lookup table (256, C) of the pixel values, from (image, level, key):
#              the pixel values are the integers 0..255, so table[image] is the op exactly
#   blend      PIL's ImageEnhance blend with a degenerate image, from (image), and a factor
# Each op: (image f32 (H, W, C) in 0..255, level in [0, 10], key) -> the same shape.

def apply_table(image, table):
  """image (H, W, C) of integer values 0..255, table (256, C) -> table[image[h, w, c], c]."""
  h, w, c = image.shape
  planes = jnp.moveaxis(image, -1, 0).reshape(c, h * w).astype(jnp.int32)  # (C, H W)
  out = jnp.take_along_axis(table.T, planes, axis=1)  # each channel's plane through its table
  return jnp.moveaxis(out.reshape(c, h, w), 0, -1)


def _values(image):
  """The pixel values 0..255 as (256, 1) float32, to tabulate an elementwise op."""
  return jnp.arange(256, dtype=image.dtype)[:, None]


def _auto_contrast_table(image, level, key):
  del level, key
  lo = jnp.min(image, axis=(0, 1))  # (C,)
  hi = jnp.max(image, axis=(0, 1))
  scale = 255.0 / jnp.maximum(hi - lo, 1.0)
  v = _values(image)
  # PIL's lut is int(v * scale - lo * scale) in double. (v - lo) * scale (v - lo is exact)
  # has one float32 rounding, which no compiled form can fuse differently, so it is the
  # float32 form closest to PIL's (at most one grey level off).
  return jnp.where(hi > lo, _u8((v - lo) * scale), v)


# How `histogram` counts: all give the same int32 counts. "scatter" adds 1 per pixel (fast
# on a CPU; on a GPU one atomic per pixel, which serialises on popular values); "matmul"
# splits each value into its high and low 4 bits and counts the pairs as (16, P) @ (P, 16)
# products of one-hot bf16 matrices with float32 sums (over chunks of pixels), which a GPU or
# TPU runs on its matrix units without atomics. "auto": scatter on CPU, matmul elsewhere.
HISTOGRAMS = ("auto", "scatter", "matmul")
_EXACT_F32 = 2 ** 24  # float32 counts are exact below this


def _histogram_scatter(values):
  return jnp.zeros(256, jnp.int32).at[values].add(1)


_HIST_CHUNK = 4096  # values per one-hot product: the one-hots stay small whatever the image


def _histogram_matmul(values):
  nibbles = jnp.arange(16, dtype=jnp.int32)
  n = values.shape[0]
  chunks = -(-n // _HIST_CHUNK)
  padded = jnp.pad(values, (0, chunks * _HIST_CHUNK - n), constant_values=-1)  # -1: no bin

  def count(total, chunk):
    high = ((chunk[:, None] >> 4) == nibbles).astype(jnp.bfloat16)  # (chunk, 16) one-hot
    low = ((chunk[:, None] & 15) == nibbles).astype(jnp.bfloat16) * (chunk[:, None] >= 0)
    return total + jnp.einsum("ph,pl->hl", high, low, preferred_element_type=jnp.float32), None

  counts, _ = jax.lax.scan(count, jnp.zeros((16, 16), jnp.float32),
                           padded.reshape(chunks, _HIST_CHUNK))
  return counts.reshape(256).astype(jnp.int32)  # value 16 h + l counted at [h, l]


def histogram(values, method: str = "auto"):
  """Counts (256,) int32 of the integers 0..255 in `values` (any shape, any dtype)."""
  if method not in HISTOGRAMS:
    raise ValueError(f"unknown histogram method {method!r}; known: {HISTOGRAMS}.")
  if values.size >= _EXACT_F32 and method != "scatter":
    raise ValueError(f"histogram of {values.size} values: float32 sums are exact only below "
                     f"{_EXACT_F32}; use method='scatter'.")
  values = values.astype(jnp.int32).ravel()
  if method == "scatter":
    return _histogram_scatter(values)
  if method == "matmul":
    return _histogram_matmul(values)
  return jax.lax.platform_dependent(values, cpu=_histogram_scatter, default=_histogram_matmul)


def _equalize_channel_table(channel):
  """PIL's ImageOps.equalize lookup table (256,) for one channel (H, W)."""
  hist = histogram(channel)
  last = hist[255 - jnp.argmax(hist[::-1] > 0)]  # count of the brightest value present
  step = (jnp.sum(hist) - last) // 255
  lut = (jnp.cumsum(hist) - hist + step // 2) // jnp.maximum(step, 1)
  return jnp.where(step > 0, jnp.clip(lut, 0, 255), jnp.arange(256)).astype(channel.dtype)


def _equalize_table(image, level, key):
  del level, key
  return jax.vmap(_equalize_channel_table, in_axes=-1, out_axes=-1)(image)


def _invert_table(image, level, key):
  del level, key
  return jnp.broadcast_to(255.0 - _values(image), (256, image.shape[-1]))


def _posterize_table(image, level, key):
  del key
  bits = 4 - jnp.floor(level / MAX_LEVEL * 4)  # timm's increasing mapping
  step = 2.0 ** (8 - jnp.clip(bits, 0, 8))
  return jnp.broadcast_to(jnp.floor(_values(image) / step) * step, (256, image.shape[-1]))


def _solarize_table(image, level, key):
  del key
  threshold = 256 - jnp.floor(level / MAX_LEVEL * 256)
  v = _values(image)
  return jnp.broadcast_to(jnp.where(v >= threshold, 255.0 - v, v), (256, image.shape[-1]))


def _solarize_add_table(image, level, key):
  del key
  add = jnp.floor(level / MAX_LEVEL * 110)
  v = _values(image)
  return jnp.broadcast_to(jnp.where(v < 128, jnp.minimum(v + add, 255.0), v),
                          (256, image.shape[-1]))


def _enhance_factor(level, key):
  return 1.0 + _signed(level / MAX_LEVEL * 0.9, key)


def _contrast_table(image, level, key):
  mean = jnp.floor(jnp.mean(_luma(image)) + 0.5)
  return jnp.broadcast_to(_blend(mean, _values(image), _enhance_factor(level, key)),
                          (256, image.shape[-1]))


def _brightness_table(image, level, key):
  return jnp.broadcast_to(_blend(0.0, _values(image), _enhance_factor(level, key)),
                          (256, image.shape[-1]))


def _color_degenerate(image):
  return _luma(image)[..., None]


def _smooth_degenerate(image):
  """PIL's SMOOTH filter (3x3, centre 5, /13; the border kept as it is)."""
  h, w, _ = image.shape
  box = sum(image[1 + dy:h - 1 + dy, 1 + dx:w - 1 + dx]
            for dy in (-1, 0, 1) for dx in (-1, 0, 1))
  inner = jnp.clip(jnp.round((box + 4 * image[1:-1, 1:-1]) / 13.0), 0, 255)
  return image.at[1:-1, 1:-1].set(inner)


def _rotate_matrix(h, w, level, key):
  """PIL's rotate(degrees) about the image centre, counter-clockwise."""
  theta = -_signed(level / MAX_LEVEL * 30.0, key) * math.pi / 180.0
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = w / 2.0, h / 2.0
  return jnp.stack([cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy])


def _shear_x_matrix(h, w, level, key):
  del h, w
  k = _signed(level / MAX_LEVEL * 0.3, key)
  return jnp.stack([1.0, k, 0.0, 0.0, 1.0, 0.0])


def _shear_y_matrix(h, w, level, key):
  del h, w
  k = _signed(level / MAX_LEVEL * 0.3, key)
  return jnp.stack([1.0, 0.0, 0.0, k, 1.0, 0.0])


def _translate_x_matrix(h, w, level, key):
  del h
  dx = _signed(level / MAX_LEVEL * 0.45, key) * w
  return jnp.stack([1.0, 0.0, dx, 0.0, 1.0, 0.0])


def _translate_y_matrix(h, w, level, key):
  del w
  dy = _signed(level / MAX_LEVEL * 0.45, key) * h
  return jnp.stack([1.0, 0.0, 0.0, 0.0, 1.0, dy])


GEOMETRIC = {"Rotate": _rotate_matrix, "ShearX": _shear_x_matrix, "ShearY": _shear_y_matrix,
             "TranslateX": _translate_x_matrix, "TranslateY": _translate_y_matrix}
TABLES = {"AutoContrast": _auto_contrast_table, "Equalize": _equalize_table,
          "Invert": _invert_table, "Posterize": _posterize_table, "Solarize": _solarize_table,
          "SolarizeAdd": _solarize_add_table, "Contrast": _contrast_table,
          "Brightness": _brightness_table}
BLENDS = {"Color": _color_degenerate, "Sharpness": _smooth_degenerate}


def _geometric(image, fns, member, level, key, warp=affine):
  """One affine warp; the op `fns[member]` gives its matrix."""
  h, w, _ = image.shape
  return warp(image, jax.lax.switch(member, [lambda l, k, f=f: f(h, w, l, k) for f in fns],
                                    level, key))


def _tabled(image, fns, member, level, key):
  """One table lookup; the op `fns[member]` gives the table."""
  return apply_table(image, jax.lax.switch(member, fns, image, level, key))


def _blended(image, fns, member, level, key):
  """One ImageEnhance blend; the op `fns[member]` gives the degenerate image."""
  degenerate = jax.lax.switch(member, [lambda x, f=f: jnp.broadcast_to(f(x), x.shape)
                                       for f in fns], image)
  return _blend(degenerate, image, _enhance_factor(level, key))


KINDS = ((GEOMETRIC, _geometric), (TABLES, _tabled), (BLENDS, _blended))


def _op(name, warp=affine):
  """The op `name` on its own: its kind's computation with a single entry."""
  entries, run = next((entries, run) for entries, run in KINDS if name in entries)
  if run is _geometric:
    return lambda image, level, key: _geometric(image, [entries[name]], 0, level, key, warp)
  return lambda image, level, key: run(image, [entries[name]], 0, level, key)


# timm's _RAND_INCREASING_TRANSFORMS, in its order; each op on its own (what the tests hold
# against PIL).
OPS = {name: _op(name) for name in (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
    "TranslateY")}


def rand_augment(key, image, *, num_layers: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5, ops=tuple(OPS),
                 by_kind: bool = True, interpolation: str = "bicubic", fill=FILL):
  """Applies `num_layers` random ops to one image (H, W, C) of values 0..255.

  `interpolation` and `fill` (a value or one per channel) are the geometric ops' (`affine`).
  `by_kind=False` is the plain definition, a switch over the ops; the default computes the
  same values with one computation per kind of op (cheaper under vmap, see KINDS).
  """
  if interpolation not in INTERPOLATIONS:
    raise ValueError(f"unknown RandAugment interpolation {interpolation!r}; expected one of "
                     f"{INTERPOLATIONS}.")
  warp = functools.partial(affine, interpolation=interpolation, fill=fill)
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f"rand_augment expects float pixel values 0..255, got {image.dtype}.")
  unknown = [o for o in ops if o not in OPS]
  if unknown:
    raise ValueError(f"unknown RandAugment ops {unknown}; known: {sorted(OPS)}.")
  if not 0 <= magnitude <= MAX_LEVEL:
    raise ValueError(f"RandAugment magnitude must be in [0, {MAX_LEVEL}], got {magnitude}.")
  groups = [[o for o in ops if o in entries] for entries, _ in KINDS]
  kind_list = [next(i for i, (entries, _) in enumerate(KINDS) if o in entries) for o in ops]
  kind_of = jnp.asarray(kind_list)
  member_of = jnp.asarray([groups[i].index(o) for i, o in zip(kind_list, ops)])
  for layer in range(num_layers):
    k_op, k_apply, k_level, k_sign = jax.random.split(jax.random.fold_in(key, layer), 4)
    index = jax.random.randint(k_op, (), 0, len(ops))
    level = jnp.clip(magnitude + magnitude_std * jax.random.normal(k_level), 0.0, MAX_LEVEL)
    if not by_kind:
      augmented = jax.lax.switch(index, [_op(o, warp) for o in ops], image, level, k_sign)
    else:
      kind, member = kind_of[index], member_of[index]
      augmented = image
      for i, (names, (entries, run)) in enumerate(zip(groups, KINDS)):
        if names:  # one computation per kind present; the op picks its entry
          fns = [entries[n] for n in names]
          extra = {"warp": warp} if run is _geometric else {}
          out = run(image, fns, jnp.where(kind == i, member, 0), level, k_sign, **extra)
          augmented = jnp.where(kind == i, out, augmented)
    image = jnp.where(jax.random.uniform(k_apply) < prob, augmented, image)
  return image

