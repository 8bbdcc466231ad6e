"""Position embeddings of a ViT's patch grid: learned, or fixed 2-D sine-cosine; resampling.

  pe = sincos2d(h, w, width)          # (1, h w, width), big_vision's / MoCo v3's fixed table
  pe = resample(old, (h, w))          # a learned table moved to another grid (big_vision's
                                      # linear; method="bicubic": timm's, antialiased;
                                      # "bicubic_no_antialias": Hugging Face's)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

POSEMBS = ("learn", "sincos2d")


def sincos2d(h: int, w: int, width: int, temperature: float = 10_000.0,
             dtype=jnp.float32) -> jnp.ndarray:
  """(1, h w, width): [sin x, cos x, sin y, cos y] of each grid cell (row-major), each over
  width / 4 log-spaced frequencies from 1 down to 1 / temperature."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs a width divisible by 4, got {width}.")
  y, x = np.mgrid[:h, :w]
  q = width // 4
  omega = 1.0 / temperature ** (np.arange(q) / max(q - 1, 1))
  ang_x = np.einsum("m,d->md", x.reshape(-1).astype(np.float64), omega)
  ang_y = np.einsum("m,d->md", y.reshape(-1).astype(np.float64), omega)
  pe = np.concatenate([np.sin(ang_x), np.cos(ang_x), np.sin(ang_y), np.cos(ang_y)], axis=1)
  return jnp.asarray(pe.astype(np.float32), dtype)[None]


def grid_of(num: int) -> tuple[int, int]:
  """The square grid of a table of `num` positions; a named error if it is not square."""
  side = math.isqrt(num)
  if side * side != num:
    raise ValueError(f"a position table of {num} rows is not a square grid; give the grid.")
  return side, side


RESAMPLINGS = ("linear", "bicubic", "bicubic_no_antialias")


def _torch_bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """(n_out, n_in): PyTorch's bicubic interpolation without antialiasing (align_corners
  False: source x = (i + 1/2) n_in / n_out - 1/2; Keys' kernel with a = -0.75; taps outside
  the grid clamped to its edge)."""
  x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
  x0 = np.floor(x).astype(int)
  t = x - x0
  near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
  far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  taps = np.clip(x0[:, None] + np.arange(-1, 3)[None], 0, n_in - 1)
  out = np.zeros((n_out, n_in))
  np.add.at(out, (np.repeat(np.arange(n_out), 4), taps.reshape(-1)), weights.reshape(-1))
  return out


def resample(old: np.ndarray, grid: tuple[int, int],
             old_grid: tuple[int, int] | None = None, method: str = "linear") -> np.ndarray:
  """(1, h w, D) learned table -> (1, H W, D) on another grid, each channel interpolated:
  "linear" as big_vision's high-res fine-tuning (scipy.ndimage.zoom, order 1), "bicubic" as
  timm's loader (PyTorch's antialiased bicubic; `jax.image.resize` computes the same
  Keys a = -0.5 filter, widened when shrinking), "bicubic_no_antialias" as Hugging Face
  transformers' ViTs interpolate theirs (PyTorch's plain bicubic, a = -0.75)."""
  import scipy.ndimage  # pylint: disable=g-import-not-at-top (jax depends on scipy)
  if method not in RESAMPLINGS:
    raise ValueError(f"unknown resampling {method!r}; expected one of {RESAMPLINGS}.")
  old = np.asarray(old)
  h, w = old_grid or grid_of(old.shape[1])
  if (h, w) == tuple(grid):
    return old
  table = old.reshape(h, w, -1)
  if method == "bicubic_no_antialias":
    rows, cols = _torch_bicubic_matrix(h, grid[0]), _torch_bicubic_matrix(w, grid[1])
    out = np.einsum("Hh,hwd,Ww->HWd", rows, table.astype(np.float64), cols)
    return out.astype(old.dtype).reshape(1, grid[0] * grid[1], -1)
  if method == "bicubic":
    out = jax.image.resize(table.astype(np.float32), (grid[0], grid[1], table.shape[-1]),
                           "bicubic", antialias=True)
    return np.asarray(out).astype(old.dtype).reshape(1, grid[0] * grid[1], -1)
  zoom = (grid[0] / h, grid[1] / w, 1)
  return scipy.ndimage.zoom(table, zoom, order=1).reshape(1, grid[0] * grid[1], -1)
