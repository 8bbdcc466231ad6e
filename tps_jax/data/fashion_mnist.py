"""Fashion-MNIST from local IDX files (the offline default data).

The Debian package `dataset-fashion-mnist` installs the four gzipped IDX files
under /usr/share/datasets/fashion-mnist; `data_dir` or the environment variable
`TPS_FASHION_MNIST_DIR` points elsewhere.
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into an array of its declared shape."""
  path = pathlib.Path(path)
  opener = gzip.open if path.suffix == ".gz" else open
  with opener(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r}).")
  ndim = data[3]
  dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  body = data[4 + 4 * ndim:]
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(body) != expected:
    raise ValueError(f"{path} is truncated or corrupt: header says {dims} "
                     f"({expected} bytes), found {len(body)} bytes.")
  return np.frombuffer(body, dtype).reshape(dims)


def data_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
  return pathlib.Path(path or os.environ.get("TPS_FASHION_MNIST_DIR", DEFAULT_DIR))


def load(split: str, path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 (N, 28, 28), labels int32 (N,)) of `split` ("train" or "test").

  Read once per process and file version (the arrays are read-only and shared): the
  experiments evaluate many models on the same split.
  """
  if split not in FILES:
    raise ValueError(f"unknown Fashion-MNIST split {split!r}; expected one of {sorted(FILES)}.")
  root = data_dir(path)
  paths = [root / name for name in FILES[split]]
  missing = [str(p) for p in paths if not p.exists()]
  if missing:
    raise FileNotFoundError(
        f"Fashion-MNIST files not found: {missing}. Install the Debian package "
        f"(apt-get install -y dataset-fashion-mnist) or set TPS_FASHION_MNIST_DIR.")
  stamp = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)
  return _read(stamp)


@functools.lru_cache(maxsize=8)
def _read(stamp) -> tuple[np.ndarray, np.ndarray]:
  paths = [pathlib.Path(p) for p, _, _ in stamp]
  images, labels = (read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{paths[0]} holds {images.shape[0]} images but {paths[1]} holds "
                     f"{labels.shape[0]} labels.")
  labels = labels.astype(np.int32)
  for a in (images, labels):
    a.setflags(write=False)
  return images, labels
