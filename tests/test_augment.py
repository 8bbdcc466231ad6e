"""RandAugment ops (jnp, on the device) against PIL (what timm calls), and the transforms."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest

from tps_jax import data
from tps_jax.data import augment, preprocess, randaugment as ra

KEY = jax.random.key(3)
RNG = np.random.default_rng(0)
NOISE = RNG.normal(120, 40, (32, 40, 3)).clip(0, 255).astype(np.uint8)
_Y, _X = np.mgrid[0:32, 0:40]
SMOOTH = np.stack([_X * 6, _Y * 7, (_X + _Y) * 3], -1).clip(0, 255).astype(np.uint8)
OP = jax.jit(lambda name, image, level, key: ra.OPS[name](image, level, key),
             static_argnums=0)


def _ours(name, image, level=5.0):
  return np.asarray(OP(name, jnp.asarray(image, jnp.float32), level, KEY)).astype(int)


def _factor(level):
  return float(ra._enhance_factor(level, KEY))  # pylint: disable=protected-access


def _signed(value):
  return float(ra._signed(value, KEY))  # pylint: disable=protected-access


PIXEL_OPS = {  # name: PIL reference of our op at level 5
    "AutoContrast": lambda im: ImageOps.autocontrast(im),
    "Equalize": lambda im: ImageOps.equalize(im),
    "Invert": lambda im: ImageOps.invert(im),
    "Posterize": lambda im: ImageOps.posterize(im, 2),  # 4 - int(0.5 * 4)
    "Solarize": lambda im: ImageOps.solarize(im, 128),  # 256 - int(0.5 * 256)
    "SolarizeAdd": lambda im: im.point([min(255, i + 55) if i < 128 else i for i in range(256)]
                                       * len(im.getbands())),  # timm's lut, add int(0.5*110)
    "Color": lambda im: ImageEnhance.Color(im).enhance(_factor(5.0)),
    "Contrast": lambda im: ImageEnhance.Contrast(im).enhance(_factor(5.0)),
    "Brightness": lambda im: ImageEnhance.Brightness(im).enhance(_factor(5.0)),
    "Sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(_factor(5.0)),
}


# PIL computes AutoContrast's table in float64, where (x - lo) * 255 / (hi - lo)
# lands just below an integer that float32 reaches exactly: those pixels are 1 apart.
OFF_BY_ONE = {"AutoContrast": 0.1}


@pytest.mark.parametrize("name", sorted(PIXEL_OPS))
def test_pixel_ops_match_pil(name):
  for image in (NOISE, SMOOTH):
    ref = np.asarray(PIXEL_OPS[name](Image.fromarray(image))).astype(int)
    diff = np.abs(_ours(name, image) - ref)
    assert diff.max() <= 1 and np.mean(diff > 0) < OFF_BY_ONE.get(name, 0.02), (
        name, diff.max(), np.mean(diff > 0))


def test_grey_images_match_pil():
  grey = NOISE[..., :1]
  for name in ("AutoContrast", "Equalize", "Contrast", "Sharpness", "Color"):
    ref = np.asarray(PIXEL_OPS[name](Image.fromarray(grey[..., 0])))[..., None].astype(int)
    assert np.abs(_ours(name, grey) - ref).max() <= 1, name


def _affine(matrix):
  return lambda im: im.transform(im.size, Image.AFFINE, matrix, Image.BICUBIC,
                                 fillcolor=(int(ra.FILL),) * 3)


GEOMETRIC_OPS = {  # timm asks PIL for bicubic sampling (DeiT's interpolation)
    "Rotate": lambda im: im.rotate(_signed(15.0), Image.BICUBIC, fillcolor=(int(ra.FILL),) * 3),
    "ShearX": lambda im: _affine((1, _signed(0.15), 0, 0, 1, 0))(im),
    "ShearY": lambda im: _affine((1, 0, 0, _signed(0.15), 1, 0))(im),
    "TranslateX": lambda im: _affine((1, 0, _signed(0.225) * 40, 0, 1, 0))(im),
    "TranslateY": lambda im: _affine((1, 0, 0, 0, 1, _signed(0.225) * 32))(im),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC_OPS))
def test_geometric_ops_match_pil(name):
  # Same pixel-centre convention as PIL: away from the fill border the two agree
  # to rounding; a wrong sign, axis or half-pixel shift would move most pixels.
  ours = _ours(name, SMOOTH)
  ref = np.asarray(GEOMETRIC_OPS[name](Image.fromarray(SMOOTH))).astype(int)
  assert np.mean(np.abs(ours - ref) > 2) < 0.02, name
  assert not np.array_equal(ours, SMOOTH)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_affine_matches_pil_with_a_mean_colour_fill(interpolation):
  # timm samples RandAugment's warps bicubic and fills with the mean colour (img_mean).
  # Bicubic is PIL's own (a = -1), to one grey level.
  matrix = (0.96, -0.26, 5.0, 0.26, 0.96, -4.0)  # a rotation with a shift: fill at two sides
  fill = data.Preprocess(size=32).fill
  assert fill == (124.0, 116.0, 104.0)  # timm's img_mean for the ImageNet mean
  pil = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[interpolation]
  ref = np.asarray(Image.fromarray(SMOOTH).transform(SMOOTH.shape[1::-1], Image.AFFINE, matrix,
                                                     pil, fillcolor=(124, 116, 104))).astype(int)
  ours = np.asarray(ra.affine(jnp.asarray(SMOOTH, jnp.float32), jnp.asarray(matrix),
                              interpolation=interpolation, fill=fill)).astype(int)
  assert (ref == np.array([124, 116, 104])).all(-1).mean() > 0.05  # the fill is in the test
  tolerance = 1 if interpolation == "bicubic" else 2
  assert np.mean(np.abs(ours - ref) > tolerance) < 0.005, interpolation
  with pytest.raises(ValueError, match="unknown interpolation 'nearest'"):
    ra.affine(jnp.asarray(SMOOTH, jnp.float32), jnp.asarray(matrix), interpolation="nearest")
  with pytest.raises(ValueError, match="unknown randaugment_interpolation 'lanczos'"):
    data.Preprocess(size=32, randaugment_interpolation="lanczos")


def test_rand_augment_is_seeded_and_checks_its_arguments():
  image = jnp.asarray(NOISE, jnp.float32)
  aug = jax.jit(lambda k, x: ra.rand_augment(k, x))
  a = np.asarray(aug(KEY, image))
  assert a.shape == NOISE.shape and np.all(a == np.round(a)) and 0 <= a.min() <= a.max() <= 255
  np.testing.assert_array_equal(a, np.asarray(aug(KEY, image)))
  outs = {np.asarray(aug(jax.random.key(s), image)).tobytes() for s in range(20)}
  assert len(outs) > 10
  with pytest.raises(ValueError, match="expects float pixel values"):
    ra.rand_augment(KEY, jnp.asarray(NOISE))
  with pytest.raises(ValueError, match="unknown RandAugment ops"):
    ra.rand_augment(KEY, image, ops=("Rotate", "Blur"))
  with pytest.raises(ValueError, match="magnitude must be in"):
    ra.rand_augment(KEY, image, magnitude=11)


@pytest.mark.parametrize("channels", [3, 1])
def test_rand_augment_by_kind_equals_the_switch_over_ops(channels):
  # Batched, rand_augment runs three computations (warp, table, blend) instead of fifteen;
  # it must give the ops' own results, for every op and both layers: the same integers except
  # where a value sits on a rounding boundary, which the two programs' different fusions
  # (floating-point contraction) may round either way (3 of 368 640 values, by 1, under
  # XLA:CPU's older emitters; none under its fusion emitters).
  keys = jax.random.split(jax.random.key(11), 96)
  images = jnp.asarray(np.stack([NOISE, SMOOTH] * 48)[..., :channels], jnp.float32)
  ours = jax.jit(jax.vmap(lambda k, x: ra.rand_augment(k, x, prob=0.9)))(keys, images)
  ref = jax.jit(jax.vmap(lambda k, x: ra.rand_augment(k, x, prob=0.9, by_kind=False)))(
      keys, images)
  drawn = [int(jax.random.randint(jax.random.split(jax.random.fold_in(k, layer), 4)[0], (), 0,
                                  len(ra.OPS))) for k in keys for layer in (0, 1)]
  assert set(drawn) == set(range(len(ra.OPS)))  # every op was drawn, in either layer
  diff = np.abs(np.asarray(ours) - np.asarray(ref))
  assert diff.max() <= 1 and np.count_nonzero(diff) <= 1e-4 * diff.size, (
      diff.max(), np.count_nonzero(diff))


def test_histogram_methods_count_exactly_and_auto_picks_by_platform():
  # Equalize's counts: the one-hot matmul (GPU/TPU) must equal the scatter (CPU) exactly,
  # on smooth and noisy images and on single-valued ones (a bin holding every pixel).
  cases = [NOISE, SMOOTH, np.zeros((32, 40, 3)), np.full((32, 40, 3), 255)]
  count = jax.jit(jax.vmap(lambda x, m: ra.histogram(x, m), in_axes=(-1, None)),
                  static_argnums=1)
  for image in cases:
    ref = np.stack([np.bincount(image[..., c].ravel().astype(int), minlength=256)
                    for c in range(3)])
    for method in ra.HISTOGRAMS:
      np.testing.assert_array_equal(np.asarray(count(jnp.asarray(image, jnp.float32), method)),
                                    ref, err_msg=method)
  lowered = lambda platform: jax.jit(ra.histogram).trace(jnp.zeros((8, 8))).lower(
      lowering_platforms=(platform,)).as_text()
  assert "scatter" in lowered("cpu") and "dot_general" not in lowered("cpu")
  assert "dot_general" in lowered("cuda") and "scatter" not in lowered("cuda")
  with pytest.raises(ValueError, match="unknown histogram method 'sort'"):
    ra.histogram(jnp.zeros(4), "sort")
  with pytest.raises(ValueError, match="exact only below"):
    ra.histogram(jax.ShapeDtypeStruct((2 ** 24,), jnp.float32), "matmul")


def test_random_erasing_box_area_and_probability():
  x = jnp.zeros((200, 64, 64, 3))
  keys = jax.random.split(jax.random.key(9), 200)
  out = np.asarray(jax.jit(jax.vmap(lambda k, i: augment.random_erasing(k, i, 0.25)))(keys, x))
  fractions, erased = [], 0
  for image in out:
    changed = np.any(image != 0, axis=-1)
    if changed.any():
      erased += 1
      fractions.append(changed.mean())
      rows, cols = np.nonzero(changed)  # one rectangle, fully noise
      assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  assert 30 <= erased <= 70  # p = 0.25 of 200
  assert 0.005 <= min(fractions) and max(fractions) <= 0.34


def test_device_train_images_depend_on_key_and_row_only():
  p = data.Preprocess(size=32, channels=3)
  images = jnp.asarray(np.stack([NOISE[:, :32]] * 4))
  fn = jax.jit(augment.train_images, static_argnums=2)
  a = np.asarray(fn(KEY, images, p))
  assert a.shape == (4, 32, 32, 3) and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(a, np.asarray(fn(KEY, images, p)))
  assert not np.array_equal(a[0], a[1])  # same image, other row: other augmentation
  assert not np.array_equal(a, np.asarray(fn(jax.random.key(4), images, p)))
  # Row b of a batch is augmented the same whatever else is in the batch.
  np.testing.assert_array_equal(a[:2], np.asarray(fn(KEY, images[:2], p)))
  plain = data.Preprocess(size=32, channels=3, randaugment=None, erasing=0.0)
  np.testing.assert_allclose(np.asarray(fn(KEY, images, plain)),
                             np.asarray(augment.normalise(images, plain)), rtol=1e-6)
  with pytest.raises(ValueError, match=r"expects \(B, H, W, 3\) images"):
    augment.train_images(KEY, images[..., :1], p)


def test_host_transforms_shapes_and_crops():
  rng = np.random.default_rng(0)
  p = data.Preprocess(size=24, channels=3)
  train = preprocess.train_image(NOISE[..., :1], rng, p)
  assert train.shape == (24, 24, 3) and train.dtype == np.uint8
  evaluated = preprocess.eval_image(SMOOTH, p)
  assert evaluated.shape == (24, 24, 3) and evaluated.dtype == np.uint8
  # Centre crop of a resize to 24 / 0.875 on the short side: the centre pixel
  # keeps the source's centre colour.
  np.testing.assert_allclose(evaluated[12, 12], SMOOTH[16, 20], atol=12)
  # timm's box: inside the image, area in scale x image area, ratio in range.
  for _ in range(200):
    top, left, h, w = preprocess.random_resized_crop_box(375, 500, rng)
    assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
    assert 0.08 * 0.9 <= h * w / (375 * 500) <= 1.0
  # Pad + random crop moves the image by at most `pad` pixels.
  grey = data.Preprocess(size=40, channels=3, crop="pad_random", pad=2, flip=False)
  square = np.pad(SMOOTH, ((4, 4), (0, 0), (0, 0)))  # 40 x 40
  for _ in range(5):
    crop = preprocess.train_image(square, rng, grey)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
              if np.array_equal(crop[2:-2, 2:-2], square[2 - dy:38 - dy, 2 - dx:38 - dx])]
    assert len(shifts) == 1
