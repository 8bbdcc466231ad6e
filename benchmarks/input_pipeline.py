"""Images/s of the training input pipeline on this machine.

  python -m benchmarks.input_pipeline [--batch 128] [--batches 40] [--jpegs 512]

Cases: Fashion-MNIST at 28 px (pad-crop, flip, RandAugment m9, erasing: the
small-image recipe) and DeiT's full recipe on 224-px crops of JPEGs written to
a temporary image folder (random resized crop from ~500x375 files, flip,
RandAugment m9, erasing). Numbers are host batches per second, measured after
a warm-up batch, the whole pipeline (decode, augment, batch) included.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # pylint: disable=wrong-import-position
import tensorflow as tf  # pylint: disable=wrong-import-position

from benchmarks import common  # pylint: disable=wrong-import-position
from tps_jax import data  # pylint: disable=wrong-import-position

FMNIST = data.Preprocess(size=28, channels=1, crop="pad_random", pad=2, randaugment=(2, 9),
                         erasing=0.25, mean=(0.286,), std=(0.353,))
DEIT = data.Preprocess(size=224)


def _write_jpegs(root: pathlib.Path, count: int) -> None:
  """JPEGs of photo-like size (500x375) with smooth content, in 10 class folders."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:375, 0:500]
  for i in range(count):
    folder = root / "train" / f"class_{i % 10}"
    folder.mkdir(parents=True, exist_ok=True)
    phase = rng.uniform(0, 6, 3)
    image = np.stack([127 + 120 * np.sin(xx / (20 + 9 * k) + yy / 31 + phase[k])
                      for k in range(3)], -1)
    image += rng.normal(0, 12, image.shape)
    jpeg = tf.io.encode_jpeg(image.clip(0, 255).astype(np.uint8), quality=90)
    (folder / f"{i}.jpg").write_bytes(jpeg.numpy())


def _rate(source, preprocess, batch: int, batches: int) -> float:
  it = data.train_batches(source, "train", preprocess, local_batch=batch, seed=0, shard=(0, 1))
  next(it)  # warm-up: tracing and the first fill of the prefetch buffer
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--jpegs", type=int, default=512)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  rows = []
  fmnist = data.get_source("fashion_mnist", prefer="idx")
  rows.append({"case": "fashion_mnist 28px (pad-crop, flip, RA m9, erasing)",
               "images_per_s": _rate(fmnist, FMNIST, args.batch, args.batches)})
  with tempfile.TemporaryDirectory() as tmp:
    _write_jpegs(pathlib.Path(tmp), args.jpegs)
    folder = data.get_source("folder", data_dir=tmp)
    jpeg_batches = max(2, min(args.batches, args.jpegs // 32 - 1))
    rows.append({"case": "JPEG 500x375 -> 224px (DeiT: RRC, flip, RA m9, erasing)",
                 "images_per_s": _rate(folder, DEIT, 32, jpeg_batches)})
    plain = data.Preprocess(size=224, randaugment=None, erasing=0.0)
    rows.append({"case": "JPEG 500x375 -> 224px (RRC, flip only)",
                 "images_per_s": _rate(folder, plain, 32, jpeg_batches)})
  common.print_table(rows, ["case", "images_per_s"])
  common.write_json("input_pipeline", {"batch": args.batch, "rows": rows}, args.out)


if __name__ == "__main__":
  main()
