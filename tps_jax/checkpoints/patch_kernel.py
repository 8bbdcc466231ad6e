"""A patch-embedding kernel moved to another patch size (FlexiViT's pseudo-inverse resize).

  new = resample_patch_kernel(kernel, (16, 16), method="bicubic")  # (14, 14, C, D) -> (16, 16, ...)

Resizing an image by a factor and embedding it with the resized kernel should give the token
the old kernel gives the old image. With R the resize as a matrix on flattened patches (old
pixels to new pixels), the kernel w' that keeps <x, w> = <R x, w'> for every x in the least
squares sense is pinv(R^T) w (Beyer et al., "FlexiViT", CVPR 2023, Sec. 3.4). big_vision
resizes with bilinear interpolation (no antialiasing, TensorFlow's `tf.image.resize`); timm's
loader with PyTorch's antialiased bicubic, which `jax.image.resize` computes alike.
"""

from __future__ import annotations

import jax
import numpy as np

# Our resampling names (posemb.RESAMPLINGS) -> (jax.image.resize method, antialias).
_METHODS = {"linear": ("linear", False), "bicubic": ("cubic", True)}


def resize_matrix(old: tuple[int, int], new: tuple[int, int], method: str) -> np.ndarray:
  """B^T, (old_h old_w, new_h new_w), of the resize B from old patches to new ones: row i is
  the i-th unit patch resized to `new`."""
  if method not in _METHODS:
    raise ValueError(f"unknown resampling {method!r}; expected one of {tuple(_METHODS)}.")
  kind, antialias = _METHODS[method]
  n = old[0] * old[1]
  basis = np.eye(n, dtype=np.float32).reshape(n, old[0], old[1])
  out = jax.image.resize(basis, (n, new[0], new[1]), kind, antialias=antialias)
  return np.asarray(out, np.float64).reshape(n, new[0] * new[1])


def resample_patch_kernel(kernel: np.ndarray, new: tuple[int, int],
                          method: str = "bicubic") -> np.ndarray:
  """(ph, pw, C, D) kernel -> (new_h, new_w, C, D), as FlexiViT / timm resample it."""
  kernel = np.asarray(kernel)
  ph, pw, c, d = kernel.shape
  if (ph, pw) == tuple(new):
    return kernel
  inverse = np.linalg.pinv(resize_matrix((ph, pw), tuple(new), method))  # pinv(B^T)
  flat = kernel.reshape(ph * pw, c * d).astype(np.float64)
  return (inverse @ flat).reshape(new[0], new[1], c, d).astype(kernel.dtype)
