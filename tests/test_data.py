"""Fashion-MNIST IDX reader on the real files (installed by scripts/setup.sh)."""

import gzip

import numpy as np
import pytest

from tps_jax.data import fashion_mnist


@pytest.mark.parametrize("split,count", [("train", 60000), ("test", 10000)])
def test_real_files_shapes_and_balance(split, count):
  images, labels = fashion_mnist.load(split)
  assert images.shape == (count, 28, 28) and images.dtype == np.uint8
  assert labels.shape == (count,)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [count // 10] * 10)


def test_images_and_labels_align_with_raw_bytes():
  root = fashion_mnist.data_dir()
  with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
    raw_images = f.read()
  with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
    raw_labels = f.read()
  images, labels = fashion_mnist.load("test")
  for i in (0, 1, 4321, 9999):  # headers are 16 and 8 bytes
    assert images[i].tobytes() == raw_images[16 + 784 * i: 16 + 784 * (i + 1)]
    assert labels[i] == raw_labels[8 + i]


def test_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
    fashion_mnist.load("test", tmp_path)
  with pytest.raises(ValueError, match="unknown Fashion-MNIST split 'val'"):
    fashion_mnist.load("val")
  bad = tmp_path / "bad.gz"
  with gzip.open(bad, "wb") as f:
    f.write(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc")
  with pytest.raises(ValueError, match="truncated or corrupt"):
    fashion_mnist.read_idx(bad)
  with gzip.open(bad, "wb") as f:
    f.write(b"PK\x03\x04rest")
  with pytest.raises(ValueError, match="not an IDX file"):
    fashion_mnist.read_idx(bad)
