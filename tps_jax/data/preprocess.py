"""Host side of DeiT's transforms, in numpy and PIL (what timm uses): uint8 in, uint8 out.

  train: decode -> random resized crop (or pad + random crop) -> resize -> flip
  eval:  decode -> resize the short side to size / crop_pct -> centre crop

Every random choice comes from the numpy Generator the pipeline hands in,
seeded by (seed, process, position), so an example's crop is a pure function
of where it sits in the stream. RandAugment, normalisation, random erasing and
mixup / CutMix run on the device (`tps_jax.data.augment`, `tps_jax.data.mixing`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROPS = ("random_resized", "pad_random", "none")
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How images become model inputs (H = W = `size`, `channels` channels).

  crop: "random_resized" (DeiT: scale `crop_scale`, ratio `crop_ratio`),
    "pad_random" (pad `pad` pixels, take a random `size` crop: the small-image
    recipe), or "none" (resize to `size`).
  randaugment: (num_layers, magnitude) or None; `randaugment_std` is the
    magnitude noise (timm's mstd); its geometric ops sample with
    `randaugment_interpolation` and fill with the mean colour (timm's img_mean).
  erasing: probability of random erasing (timm's mode "pixel"), 0 to disable.
  crop_pct: eval resizes the short side to size / crop_pct, then centre-crops.

  The host does decode, crop, resize and flip (uint8 out); the device does
  RandAugment, normalisation and random erasing (`tps_jax.data.augment`).
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
  randaugment_interpolation: str = "bicubic"  # timm's for DeiT; or "bilinear"
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
    if self.resize_method not in _RESAMPLE:
      raise ValueError(f"unknown resize_method {self.resize_method!r}; expected one of "
                       f"{sorted(_RESAMPLE)}.")
    if self.randaugment_interpolation not in ("bicubic", "bilinear"):
      raise ValueError(f"unknown randaugment_interpolation {self.randaugment_interpolation!r}; "
                       "expected 'bicubic' or 'bilinear'.")
    if self.randaugment is not None:
      layers, magnitude = self.randaugment
      if int(layers) != layers or layers < 0 or not 0 <= magnitude <= 10:
        raise ValueError(f"randaugment is (num_layers >= 0, magnitude in [0, 10]), got "
                         f"{self.randaugment}.")


  @property
  def fill(self) -> tuple[float, ...]:
    """The mean colour in pixel values (timm's img_mean: mean x 255, rounded), per channel."""
    mean = self.mean * self.channels if len(self.mean) == 1 else self.mean
    return tuple(float(round(255 * m)) for m in mean)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
  """uint8 (H, W, 1 or 3) -> (H, W, channels): grey repeated, colour to PIL's luma."""
  have = image.shape[-1]
  if have == channels:
    return image
  if have == 1:
    return np.repeat(image, 3, axis=-1)
  return np.asarray(Image.fromarray(image).convert("L"))[..., None]


def resize(image: np.ndarray, size_hw: tuple[int, int], method: str,
           box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """uint8 (H, W, C) -> (h, w, C) with PIL (antialiased); `box` = (top, left, height, width)."""
  h, w = size_hw
  if box is None and image.shape[:2] == (h, w):
    return image
  grey = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if grey else image)
  pil_box = None if box is None else (box[1], box[0], box[1] + box[3], box[0] + box[2])
  out = np.asarray(pil.resize((w, h), _RESAMPLE[method], box=pil_box))
  return out[..., None] if grey else out


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """timm's RandomResizedCrop.get_params: (top, left, h, w), 10 tries then a centre crop."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def pad_random_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
  """Zero-pad `pad` pixels on each side, take a random crop of the original size."""
  h, w, _ = image.shape
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  return padded[top:top + h, left:left + w]


def train_image(image: np.ndarray, rng: np.random.Generator, p: Preprocess) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (size, size, channels): crop, resize, flip."""
  image = to_channels(image, p.channels)
  if p.crop == "random_resized":
    box = random_resized_crop_box(*image.shape[:2], rng, p.crop_scale, p.crop_ratio)
    image = resize(image, (p.size, p.size), p.resize_method, box=box)
  elif p.crop == "pad_random":
    image = pad_random_crop(resize(image, (p.size, p.size), p.resize_method), p.pad, rng)
  else:
    image = resize(image, (p.size, p.size), p.resize_method)
  if p.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


def eval_image(image: np.ndarray, p: Preprocess) -> np.ndarray:
  """uint8 (H, W, C) -> uint8 (size, size, channels): timm's resize + centre crop."""
  image = to_channels(image, p.channels)
  h, w = image.shape[:2]
  short = int(math.floor(p.size / p.crop_pct))
  if h <= w:
    new = (short, int(short * w / h))
  else:
    new = (int(short * h / w), short)
  image = resize(image, new, p.resize_method)
  top = int(round((new[0] - p.size) / 2.0))
  left = int(round((new[1] - p.size) / 2.0))
  return np.ascontiguousarray(image[top:top + p.size, left:left + p.size])
