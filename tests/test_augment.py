"""RandAugment ops against PIL (timm's reference implementation uses PIL), and the transforms."""

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from tps_jax import data
from tps_jax.data import preprocess, randaugment as ra

SEED = tf.constant([1, 2], tf.int64)
RNG = np.random.default_rng(0)
NOISE = RNG.normal(120, 40, (32, 40, 3)).clip(0, 255).astype(np.uint8)
_Y, _X = np.mgrid[0:32, 0:40]
SMOOTH = np.stack([_X * 6, _Y * 7, (_X + _Y) * 3], -1).clip(0, 255).astype(np.uint8)


def _factor(level):
  return float(ra._enhance_factor(level, SEED))  # pylint: disable=protected-access


def _signed(value):
  return float(ra._signed(value, SEED))  # pylint: disable=protected-access


PIXEL_OPS = {  # name: (our op at level 5, PIL reference)
    "AutoContrast": lambda im: ImageOps.autocontrast(im),
    "Equalize": lambda im: ImageOps.equalize(im),
    "Invert": lambda im: ImageOps.invert(im),
    "Posterize": lambda im: ImageOps.posterize(im, 2),  # 4 - int(0.5 * 4)
    "Solarize": lambda im: ImageOps.solarize(im, 128),  # 256 - int(0.5 * 256)
    "Color": lambda im: ImageEnhance.Color(im).enhance(_factor(5.0)),
    "Contrast": lambda im: ImageEnhance.Contrast(im).enhance(_factor(5.0)),
    "Brightness": lambda im: ImageEnhance.Brightness(im).enhance(_factor(5.0)),
    "Sharpness": lambda im: ImageEnhance.Sharpness(im).enhance(_factor(5.0)),
}


@pytest.mark.parametrize("name", sorted(PIXEL_OPS))
def test_pixel_ops_match_pil(name):
  ours = ra.OPS[name](tf.constant(NOISE), 5.0, SEED).numpy().astype(int)
  ref = np.asarray(PIXEL_OPS[name](Image.fromarray(NOISE))).astype(int)
  assert np.abs(ours - ref).max() <= 1  # rounding only


def _affine(matrix):
  return lambda im: im.transform(im.size, Image.AFFINE, matrix, Image.BILINEAR,
                                 fillcolor=(ra.FILL,) * 3)


GEOMETRIC_OPS = {
    "Rotate": lambda im: im.rotate(_signed(15.0), Image.BILINEAR, fillcolor=(ra.FILL,) * 3),
    "ShearX": lambda im: _affine((1, _signed(0.15), 0, 0, 1, 0))(im),
    "ShearY": lambda im: _affine((1, 0, 0, _signed(0.15), 1, 0))(im),
    "TranslateX": lambda im: _affine((1, 0, _signed(0.225) * 40, 0, 1, 0))(im),
    "TranslateY": lambda im: _affine((1, 0, 0, 0, 1, _signed(0.225) * 32))(im),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIC_OPS))
def test_geometric_ops_match_pil(name):
  # On a smooth image the two agree but for the half-pixel conventions at the
  # fill border; a wrong sign or axis would move most pixels.
  ours = ra.OPS[name](tf.constant(SMOOTH), 5.0, SEED).numpy().astype(int)
  ref = np.asarray(GEOMETRIC_OPS[name](Image.fromarray(SMOOTH))).astype(int)
  assert np.mean(np.abs(ours - ref) > 3) < 0.05


def test_rand_augment_is_seeded_and_checks_its_arguments():
  image = tf.constant(NOISE)
  a = ra.rand_augment(image, SEED).numpy()
  assert a.shape == NOISE.shape and a.dtype == np.uint8
  np.testing.assert_array_equal(a, ra.rand_augment(image, SEED).numpy())
  outs = {ra.rand_augment(image, tf.constant([s, 0], tf.int64)).numpy().tobytes()
          for s in range(20)}
  assert len(outs) > 10
  with pytest.raises(ValueError, match="expects a uint8 image"):
    ra.rand_augment(tf.cast(image, tf.float32), SEED)
  with pytest.raises(ValueError, match="unknown RandAugment ops"):
    ra.rand_augment(image, SEED, ops=("Rotate", "Blur"))
  with pytest.raises(ValueError, match="magnitude must be in"):
    ra.rand_augment(image, SEED, magnitude=11)


def test_random_erasing_box_area_and_probability():
  x = tf.zeros((64, 64, 3))
  fractions, erased = [], 0
  for s in range(200):
    out = preprocess.random_erasing(x, tf.constant([s, 9], tf.int64), 0.25).numpy()
    changed = np.any(out != 0, axis=-1)
    if changed.any():
      erased += 1
      fractions.append(changed.mean())
      rows, cols = np.nonzero(changed)  # one rectangle, fully noise
      assert changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
  assert 30 <= erased <= 70  # p = 0.25 of 200
  assert 0.005 <= min(fractions) and max(fractions) <= 0.34


def test_train_and_eval_images_have_model_shape():
  grey = tf.constant(NOISE[..., :1])
  p = data.Preprocess(size=24, channels=3)
  train = preprocess.train_image(grey, SEED, p).numpy()
  assert train.shape == (24, 24, 3) and np.isfinite(train).all()
  evaluated = preprocess.eval_image(tf.constant(SMOOTH), p).numpy()
  assert evaluated.shape == (24, 24, 3)
  # Centre crop of a resize to 24 / 0.875 on the short side: the centre pixel
  # keeps the source's centre colour.
  centre = SMOOTH[16, 20] / 255.0
  expect = (centre - np.array(p.mean)) / np.array(p.std)
  np.testing.assert_allclose(evaluated[12, 12], expect, atol=0.15)
