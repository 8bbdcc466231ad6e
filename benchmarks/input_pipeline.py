"""Images/s of the training input pipeline (grain host part, device augmentation) here.

  python -m benchmarks.input_pipeline [--batch 128] [--batches 40] [--jpegs 512]

Host cases (decode, crop, resize, flip; uint8 out), each with grain threads
and with grain worker processes:
  - Fashion-MNIST at 28 px (pad-crop, flip): the small-image recipe;
  - DeiT's host part on 224-px crops of ~500x375 JPEGs written to a temporary
    image folder (decode, random resized crop, bicubic resize, flip).
Device case: RandAugment m9 + normalise + random erasing of a uint8 batch,
jitted, on this machine's default device (the part that moved off the host);
and RandAugment alone at 224 px, batched by kind (what the step runs) against
the plain switch over the 15 ops (`rand_augment(by_kind=False)`), in one run;
and Equalize's per-channel histograms of a 224-px batch by each method
(`randaugment.HISTOGRAMS`), on noise and on smooth, photo-like content (where
neighbouring pixels share a bin, the case that serialises atomic adds).
`--boundary` times only the epoch boundary on ImageNet's scale: 16 threads read the
last rows of epoch 0 and the first of epoch 1 interleaved (as grain's readers do there), with
the shuffled order's cache holding one epoch (the old, shared one-entry cache) or three (the
pipeline's); rows give the permutations drawn and rows/s.
`--device_only` skips the host cases (the lent GPU machine has no grain), `--only TEXT`
runs only the device cases whose name holds TEXT (e.g. "histograms").

Rows give images/s in all and per host core used. `tf_data_before` is the
figure of the TensorFlow pipeline this replaced, on the same 2-core CPU
(whole recipe: RandAugment and erasing were on the host then).
"""

from __future__ import annotations

import argparse
import io
import os
import pathlib
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from benchmarks import common
from tps_jax import timing
from tps_jax import data
from tps_jax.data import randaugment

FMNIST = data.Preprocess(size=28, channels=1, crop="pad_random", pad=2, randaugment=(2, 9),
                         erasing=0.25, mean=(0.286,), std=(0.353,))
DEIT = data.Preprocess(size=224)
TF_DATA_BEFORE = {"fmnist": 6405, "deit": 179, "deit_rrc_flip": 444}  # img/s, 2 cores


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
    out = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    (folder / f"{i}.jpg").write_bytes(out.getvalue())


def _host_rate(source, preprocess, batch: int, batches: int, threads: int,
               workers: int) -> float:
  it = data.train_batches(source, "train", preprocess, local_batch=batch, seed=0, shard=(0, 1),
                          threads=threads, workers=workers)
  next(it)  # warm-up: worker start and the first fill of the buffers
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batch * batches / (time.perf_counter() - start)


def _device_rate(preprocess, batch: int, repeats: int = 5) -> float:
  size, channels = preprocess.size, preprocess.channels
  images = jax.random.randint(jax.random.key(0), (batch, size, size, channels), 0, 256,
                              jnp.int32).astype(jnp.uint8)
  fn = jax.jit(data.train_images, static_argnums=2)
  t = timing.time_call(lambda: fn(jax.random.key(1), images, preprocess),
                       repeats=repeats, warmup=1)
  return batch / t["median_s"]


def _randaugment_rate(size: int, batch: int, by_kind: bool, repeats: int = 5) -> float:
  images = jax.random.randint(jax.random.key(0), (batch, size, size, 3), 0, 256,
                              jnp.int32).astype(jnp.float32)
  keys = jax.random.split(jax.random.key(1), batch)
  fn = jax.jit(jax.vmap(lambda k, x: randaugment.rand_augment(k, x, by_kind=by_kind)))
  t = timing.time_call(fn, keys, images, repeats=repeats, warmup=1)
  return batch / t["median_s"]


def _histogram_rate(size: int, batch: int, method: str, smooth: bool,
                    repeats: int = 5) -> float:
  shape = (batch, size, size, 3)
  if smooth:  # slow gradients, a few grey levels of noise: runs of equal values
    yy, xx = jnp.meshgrid(jnp.arange(size), jnp.arange(size), indexing="ij")
    base = (xx[..., None] * (1 + jnp.arange(3)) + yy[..., None]) % 256
    noise = jax.random.randint(jax.random.key(0), shape, -2, 3)
    images = jnp.clip(base + noise, 0, 255).astype(jnp.float32)
  else:
    images = jax.random.randint(jax.random.key(0), shape, 0, 256, jnp.int32).astype(jnp.float32)
  per_channel = jax.vmap(lambda ch: randaugment.histogram(ch, method), in_axes=-1)
  fn = jax.jit(jax.vmap(per_channel))
  t = timing.time_call(fn, images, repeats=repeats, warmup=1)
  return batch / t["median_s"]


def _boundary_rows(cached: int, rows: int = 512, threads: int = 16) -> dict:
  """Rows/s of reading `rows` positions around an epoch boundary of a 1.28M-entry shard."""
  import threading  # pylint: disable=g-import-not-at-top
  from tps_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  n = 1_281_167
  used = n // 1024 * 1024
  order = pipeline._EpochOrder(0, n, used, seed=0, cached=cached)  # pylint: disable=protected-access
  half = rows // 2
  positions = [p for i in range(half) for p in (used - 1 - i, used + i)]
  start = time.perf_counter()
  workers = [threading.Thread(target=lambda c: [order[p] for p in c], args=(positions[i::threads],))
             for i in range(threads)]
  for w in workers:
    w.start()
  for w in workers:
    w.join()
  seconds = time.perf_counter() - start
  return {"case": f"epoch boundary, 1.28M-entry shard, {threads} threads, {rows} rows",
          "cached_epochs": cached, "permutations_drawn": order.draws, "seconds": seconds,
          "rows_per_s": rows / seconds}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--batches", type=int, default=40)
  parser.add_argument("--jpegs", type=int, default=512)
  parser.add_argument("--out", default=None)
  parser.add_argument("--device_only", action="store_true", help="skip the host cases")
  parser.add_argument("--only", default="", help="run only the device cases naming this")
  parser.add_argument("--boundary", action="store_true",
                      help="only the epoch-boundary case (the shuffled order's cache)")
  args = parser.parse_args(argv)
  if args.boundary:
    rows = [_boundary_rows(cached) for cached in (1, 3)]
    common.print_table(rows, list(rows[0]))
    common.write_json("input_pipeline_boundary", {"rows": rows}, args.out)
    return
  cores = os.cpu_count() or 1
  modes = [("threads", cores, 0), ("workers", 1, cores)]

  rows = []

  def add(case, before, rate, mode, used):
    rows.append({"case": case, "mode": mode, "host_cores": used, "images_per_s": rate,
                 "per_core": rate / used if used else None, "tf_data_before": before,
                 "vs_before": rate / before if before else None})

  if not args.device_only:
    fmnist = data.get_source("fashion_mnist", prefer="idx")
    for mode, threads, workers in modes:
      add("fashion_mnist 28px host (pad-crop, flip)", TF_DATA_BEFORE["fmnist"],
          _host_rate(fmnist, FMNIST, args.batch, args.batches, threads, workers), mode, cores)
    with tempfile.TemporaryDirectory() as tmp:
      _write_jpegs(pathlib.Path(tmp), args.jpegs)
      folder = data.get_source("folder", data_dir=tmp)
      jpeg_batches = max(2, min(args.batches, args.jpegs // 32 - 1))
      for mode, threads, workers in modes:
        add("JPEG 500x375 -> 224px host (decode, RRC, flip)", TF_DATA_BEFORE["deit"],
            _host_rate(folder, DEIT, 32, jpeg_batches, threads, workers), mode, cores)
  device = jax.devices()[0].platform
  used = 0 if device != "cpu" else cores
  deit_batch = 32 if device == "cpu" else 256  # the GPU runs DeiT's training batch
  cases = {f"{name} device (RandAugment m9, normalise, erasing)":
           lambda p=p, b=b: _device_rate(p, b)
           for name, p, b in (("fashion_mnist 28px", FMNIST, args.batch),
                              ("DeiT 224px", DEIT, deit_batch))}
  for by_kind, label in ((True, "by kind"), (False, "switch over 15 ops")):
    cases[f"DeiT 224px device RandAugment m9 only, {label}"] = (
        lambda k=by_kind: _randaugment_rate(224, deit_batch, k))
  for method in randaugment.HISTOGRAMS[1:]:
    for smooth in (False, True):
      cases[f"DeiT 224px device Equalize histograms, {method}, "
            f"{'smooth' if smooth else 'noise'}"] = (
                lambda m=method, s=smooth: _histogram_rate(224, deit_batch, m, s))
  for case, rate in cases.items():
    if args.only in case:
      add(case, None, rate(), f"jit on {device}", used)
  common.print_table(rows, ["case", "mode", "host_cores", "images_per_s", "per_core",
                            "tf_data_before", "vs_before"])
  common.write_json("input_pipeline", {"batch": args.batch, "cores": cores, "rows": rows},
                    args.out)


if __name__ == "__main__":
  from tps_jax import cli  # pylint: disable=g-import-not-at-top
  cli.run(main)
