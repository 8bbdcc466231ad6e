"""Input pipeline on real bytes: Fashion-MNIST files, an image folder, tfds datasets."""

import gzip
import io
import itertools
import logging
import threading
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from tps_jax import data
from tps_jax.data import fashion_mnist
from tps_jax.data import pipeline

FMNIST = data.Preprocess(size=28, channels=1, crop="pad_random", pad=2, randaugment=(2, 9),
                         erasing=0.25, mean=(0.286,), std=(0.353,))
PLAIN = data.Preprocess(size=28, channels=1, crop="none", flip=False, randaugment=None,
                        erasing=0.0, crop_pct=1.0, mean=(0.0,), std=(1 / 255,))


@pytest.fixture(scope="module")
def fmnist():
  return data.get_source("fashion_mnist", prefer="idx")


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _rows(batches):
  """(image bytes, label) of every real row."""
  out = []
  for b in batches:
    mask = b.get("mask", np.ones(len(b["label"]), bool))
    for image, label in zip(b["image"][mask], b["label"][mask]):
      out.append((np.round(image).astype(np.uint8).tobytes(), int(label)))
  return out


def test_eval_batches_align_with_raw_idx_bytes(fmnist):
  root = fashion_mnist.data_dir()
  with gzip.open(root / "t10k-images-idx3-ubyte.gz") as f:
    raw_images = f.read()
  with gzip.open(root / "t10k-labels-idx1-ubyte.gz") as f:
    raw_labels = f.read()
  batches = list(data.eval_batches(fmnist, "test", PLAIN, local_batch=4096, shard=(0, 1)))
  assert [len(b["label"]) for b in batches] == [4096, 4096, 4096]
  rows = _rows(batches)
  assert len(rows) == 10000 and sum(b["mask"].sum() for b in batches) == 10000
  for i in (0, 1, 777, 9999):
    assert rows[i][0] == raw_images[16 + 784 * i: 16 + 784 * (i + 1)]
    assert rows[i][1] == raw_labels[8 + i]
  assert not batches[-1]["mask"][10000 - 8192:].any()


def test_train_batches_shapes_determinism_and_resume(fmnist):
  kw = dict(local_batch=256, seed=3)
  a = _take(data.train_batches(fmnist, "train", FMNIST, **kw), 4)
  b = _take(data.train_batches(fmnist, "train", FMNIST, **kw), 4)
  c = _take(data.train_batches(fmnist, "train", FMNIST, local_batch=256, seed=4), 1)
  assert a[0]["image"].shape == (256, 28, 28, 1) and a[0]["image"].dtype == np.uint8
  assert a[0]["label"].dtype == np.int32
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  resumed = _take(data.train_batches(fmnist, "train", FMNIST, start_step=2, **kw), 2)
  for x, y in zip(a[2:], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  # uint8 pixels of Fashion-MNIST (mean 73 of 255) with a 2-pixel zero border shifted in.
  images = np.concatenate([x["image"] for x in a])
  assert a[0]["image"].dtype == np.uint8 and 55 < images.mean() < 80


def test_train_epochs_are_permutations_and_resume_across_epochs():
  images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(4, 1).repeat(4, 2)
  source = data.ArraySource({"train": (images, np.arange(40) % 5)}, num_classes=5)
  plain = data.Preprocess(size=4, channels=1, crop="none", flip=False, randaugment=None,
                          erasing=0.0, mean=(0.0,), std=(1 / 255,))
  batches = _take(data.train_batches(source, "train", plain, local_batch=8, seed=0), 10)
  ids = [np.round(b["image"][:, 0, 0, 0]).astype(int) for b in batches]
  epoch0, epoch1 = np.concatenate(ids[:5]), np.concatenate(ids[5:])
  assert sorted(epoch0) == list(range(40)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)  # reshuffled
  np.testing.assert_array_equal(np.concatenate(ids[:5]) % 5,
                                np.concatenate([b["label"] for b in batches[:5]]))
  resumed = _take(data.train_batches(source, "train", plain, local_batch=8, seed=0,
                                     start_step=4), 3)
  for x, y in zip(batches[4:7], resumed):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_epoch_orders_are_drawn_once_when_threads_straddle_an_epoch_boundary():
  # grain's reader threads read epochs e and e + 1 side by side at a
  # boundary; a one-entry cache made them evict each other and redraw a permutation per row.
  used, lo, hi = 64, 10, 90
  order = pipeline._EpochOrder(lo, hi, used, seed=3)  # pylint: disable=protected-access
  positions = [p for i in range(used) for p in (used - 1 - i, used + i, 2 * used + i)]
  results = {}

  def read(chunk):
    for p in chunk:
      results[p] = order[p]

  threads = [threading.Thread(target=read, args=(positions[i::8],)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert order.draws == 3  # each epoch's permutation drawn once
  for epoch in range(3):
    want = np.random.default_rng([3, epoch]).permutation(np.arange(lo, hi))[:used]
    np.testing.assert_array_equal([results[epoch * used + k] for k in range(used)], want)


class _FlakySource:
  """n records "img{i}.png" whose image is filled with i; those in `bad` cannot be decoded."""

  def __init__(self, n, bad):
    self.n, self.bad = n, set(bad)

  def records(self, split):
    del split
    return [{"image": f"img{i}.png", "label": i} for i in range(self.n)]

  def decode(self, name):
    i = int(name[3:-4])
    if i in self.bad:
      raise ValueError(f"cannot decode image file {name}: truncated")
    return np.full((4, 4, 1), i % 256, np.uint8)


def test_an_undecodable_image_is_replaced_named_and_counted_within_a_budget(caplog):
  # one corrupt image mid-dataset ended the run for good (the stream is
  # deterministic, so a restart died at the same place).
  tiny = data.Preprocess(size=4, channels=1, crop="none", flip=False, randaugment=None,
                         erasing=0.0, crop_pct=1.0, mean=(0.0,), std=(1.0,))
  source = _FlakySource(2000, bad={7})  # budget 0.1%: 2 images

  def labels(src, steps=20, **kw):
    it = data.train_batches(src, "train", tiny, local_batch=100, seed=1, shard=(0, 1), **kw)
    return np.concatenate([next(it)["label"] for _ in range(steps)])

  with caplog.at_level(logging.WARNING):
    got = labels(source)
  assert caplog.text.count("img7.png cannot be decoded") == 1  # named once, and counted
  assert "1 of a budget of 2" in caplog.text
  clean = labels(_FlakySource(2000, bad=()))
  swapped = np.flatnonzero(got != clean)
  assert clean[swapped].tolist() == [7] and got[swapped].tolist() == [8]  # its neighbour
  np.testing.assert_array_equal(labels(source), got)  # deterministic: a resume sees the same
  with pytest.raises(ValueError, match=r"3 image\(s\) of split 'train' cannot be decoded, more "
                                       r"than its budget of 2 .*img\d+.png"):
    labels(_FlakySource(2000, bad={3, 500, 1500}))
  labels(_FlakySource(2000, bad={3, 500, 1500}), bad_budget=0.002)  # a larger budget holds
  # 0.1% of 96 images rounds down to none: a budget tolerates at least one image ...
  def epoch(**kw):
    it = data.train_batches(_FlakySource(96, bad={5}), "train", tiny, local_batch=32, seed=1,
                            shard=(0, 1), **kw)
    return np.concatenate([next(it)["label"] for _ in range(3)])
  assert sorted(epoch().tolist()) == sorted([i for i in range(96) if i != 5] + [6])
  with pytest.raises(ValueError, match="budget of 0"):  # ... unless it is 0
    epoch(bad_budget=0.0)
  rows = list(data.eval_batches(source, "test", tiny, local_batch=300, shard=(0, 1)))
  mask = np.concatenate([r["mask"] for r in rows])
  kept = np.concatenate([r["label"] for r in rows])[mask]
  assert mask.sum() == 1999 and 7 not in kept.tolist()  # left out of evaluation


def test_threads_and_worker_processes_give_the_same_batches():
  images = np.random.default_rng(0).integers(0, 255, (64, 12, 12, 1), dtype=np.uint8)
  source = data.ArraySource({"train": (images, np.arange(64) % 4)}, num_classes=4)
  p = data.Preprocess(size=8, channels=1, crop="pad_random", pad=2, randaugment=None,
                      erasing=0.0, mean=(0.5,), std=(0.5,))
  kw = dict(local_batch=8, seed=2, start_step=5)
  threads = _take(data.train_batches(source, "train", p, threads=3, **kw), 6)
  workers = _take(data.train_batches(source, "train", p, workers=2, **kw), 6)
  for x, y in zip(threads, workers):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_two_processes_read_disjoint_shards(fmnist):
  parts = [_rows(data.eval_batches(fmnist, "test", PLAIN, local_batch=1000, shard=(i, 2)))
           for i in range(2)]
  assert [len(p) for p in parts] == [5000, 5000]
  whole = _rows(data.eval_batches(fmnist, "test", PLAIN, local_batch=5000, shard=(0, 1)))
  assert parts[0] + parts[1] == whole
  # Training epochs of the two shards are disjoint too (images 0..39 as ids).
  images = np.arange(42, dtype=np.uint8).reshape(42, 1, 1, 1)
  source = data.ArraySource({"train": (images, np.zeros(42))}, num_classes=1)
  plain = data.Preprocess(size=1, channels=1, crop="none", flip=False, randaugment=None,
                          erasing=0.0, mean=(0.0,), std=(1 / 255,))
  seen = []
  for i in range(2):
    batches = _take(data.train_batches(source, "train", plain, local_batch=5, seed=1,
                                       shard=(i, 2)), 4)  # 21 per shard -> 4 full batches
    seen.append({int(round(v)) for b in batches for v in b["image"].ravel()})
  assert not seen[0] & seen[1] and seen[0] | seen[1] <= set(range(42))
  assert seen[0] <= set(range(21)) and seen[1] <= set(range(21, 42))


@pytest.mark.parametrize("devices", [1, 8])
def test_eval_covers_each_example_once_over_devices(devices):
  assert len(jax.devices()) >= devices
  mesh = jax.make_mesh((devices,), ("data",), devices=jax.devices()[:devices],
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  n = 37
  images = np.arange(n, dtype=np.uint8).reshape(n, 1, 1, 1).repeat(2, 1).repeat(2, 2)
  source = data.ArraySource({"test": (images, np.arange(n))}, num_classes=n)
  plain = data.Preprocess(size=2, channels=1, crop="none", flip=False, randaugment=None,
                          erasing=0.0, crop_pct=1.0, mean=(0.0,), std=(1 / 255,))
  local = data.local_batch_size(16, sharding)
  seen = []
  for batch in data.device_prefetch(data.eval_batches(source, "test", plain,
                                                      local_batch=local), sharding):
    assert batch["image"].sharding.is_equivalent_to(sharding, 4)
    assert len(batch["image"].addressable_shards) == devices
    mask = np.asarray(batch["mask"])
    seen.extend(np.asarray(batch["label"])[mask].tolist())
  assert sorted(seen) == list(range(n))
  with pytest.raises(ValueError, match="does not divide over the 8 devices"):
    data.local_batch_size(12, jax.sharding.NamedSharding(
        jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,)), jax.P("data")))


def test_device_prefetch_reraises_pipeline_errors():
  def broken():
    yield {"x": np.zeros((8, 2), np.float32)}
    raise RuntimeError("corrupt record 7")

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  it = data.device_prefetch(broken(), sharding)
  assert next(it)["x"].shape == (8, 2)
  with pytest.raises(RuntimeError, match="corrupt record 7"):
    next(it)


def test_mixing_targets_sum_to_one_and_match_the_pixels():
  rng = jax.random.key(0)
  images = jnp.stack([jnp.full((16, 16, 3), float(i)) for i in range(8)])
  labels = jnp.arange(8) % 4
  for seed in range(6):
    mixed, targets = jax.jit(data.mix, static_argnums=(3, 4))(
        jax.random.fold_in(rng, seed), images, labels, 4, data.Mixing(smoothing=0.1))
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    # Image i is mixed only with image 7 - i; the weight of its own label is the
    # fraction of its own pixels (CutMix) or its coefficient (mixup).
    own = (mixed[0] - 7.0) / (0.0 - 7.0)  # pixel values of image 0 mixed with image 7
    frac = float(jnp.mean(own))
    lam = (float(targets[0, 0]) - 0.1 / 4) / 0.9  # labels 0 and 3 differ
    assert abs(frac - lam) < 1e-5, (seed, frac, lam)
  none, t = data.mix(rng, images, labels, 4, data.Mixing(prob=0.0, smoothing=0.0))
  np.testing.assert_array_equal(none, images)
  np.testing.assert_array_equal(t, jax.nn.one_hot(labels, 4))


def _encode(image, fmt):
  out = io.BytesIO()
  Image.fromarray(image.squeeze()).save(out, fmt, quality=95)
  return out.getvalue()


def _write_folder(root, corrupt=True):
  rng = np.random.default_rng(0)
  for split, count in (("train", 6), ("val", 3)):
    for c, name in enumerate(("cat", "dog")):
      d = root / split / name
      d.mkdir(parents=True)
      for i in range(count):
        image = rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)
        image[0, 0] = (c * 100, i, 7)
        if i % 2:
          (d / f"{i}.png").write_bytes(_encode(image, "PNG"))
        else:
          (d / f"{i}.jpg").write_bytes(_encode(image, "JPEG"))
      if split == "train" and corrupt:
        (d / "broken.jpg").write_bytes(b"not an image at all")
        (d / "notes.txt").write_text("ignored: not an image extension")


def test_mixing_pairs_within_each_device_shard_and_moves_nothing_between_devices():
  # with one group per device shard, image i mixes only with the mirrored
  # row of its own shard, each shard with its own coefficient (timm's per-GPU Mixup), and
  # the compiled step has no collective; the global mirror needed a collective permute.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  b, per = 32, 4
  images = jax.device_put(jnp.stack([jnp.full((8, 8, 1), float(i)) for i in range(b)]), sharding)
  labels = jax.device_put(jnp.arange(b) % 4, sharding)
  cfg = data.Mixing(mixup_alpha=0.8, cutmix_alpha=0.0, smoothing=0.0)

  def hlo(f):
    f = jax.jit(f)
    return f, f.lower(jax.random.key(1), images, labels).compile().as_text()

  collectives = ("collective-permute", "all-to-all", "all-gather", "all-reduce")
  step, text = hlo(lambda r, x, y: data.mix_per_shard(r, x, y, 4, cfg, sharding))
  assert not [c for c in collectives if c in text]
  _, text = hlo(lambda r, x, y: data.mix(r, x, y, 4, cfg))
  assert "collective-permute" in text  # the global mirror moves images
  mixed, targets = step(jax.random.key(1), images, labels)
  mixed, targets = np.asarray(mixed), np.asarray(targets)
  lams = []
  for i in range(b):
    g, j = divmod(i, per)
    partner = g * per + per - 1 - j
    lam = targets[i, i % 4]
    if i % 4 == partner % 4:
      continue  # same label: the coefficient is not readable from the targets
    np.testing.assert_allclose(mixed[i], lam * i + (1 - lam) * partner, rtol=1e-5)
    lams.append((g, round(float(lam), 5)))
  assert len({lam for _, lam in lams}) > 1  # shards draw their own coefficients
  for g in range(b // per):
    assert len({lam for gg, lam in lams if gg == g and lam > 0.5}) <= 1


def test_image_folder_source_and_bad_files(tmp_path, caplog):
  _write_folder(tmp_path)
  with caplog.at_level(logging.WARNING):
    source = data.get_source("folder", data_dir=tmp_path)
    assert source.num_examples("train") == 12
  assert "skipped 2 unreadable image file" in caplog.text and "broken.jpg" in caplog.text
  assert source.num_classes == 2 and source.classes == ["cat", "dog"]
  preprocess = data.Preprocess(size=32)  # DeiT's full train recipe at 32 px
  batch = next(data.train_batches(source, "train", preprocess, local_batch=4, seed=0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  rows = list(data.eval_batches(source, "val", data.Preprocess(size=32), local_batch=4,
                                shard=(0, 1)))
  assert sum(r["mask"].sum() for r in rows) == 6
  assert sorted(np.concatenate([r["label"][r["mask"]] for r in rows])) == [0, 0, 0, 1, 1, 1]


def test_split_slices_select_examples_in_order(tmp_path):
  # tfds's "NAME[START:STOP]" on every source (tfds reads it itself): the tiny test recipe
  # evaluates on test[:2000].
  source = data.get_source("fashion_mnist", prefer="idx")
  images, labels = fashion_mnist.load("test")
  assert source.num_examples("test[:2000]") == 2000
  np.testing.assert_array_equal(source.records("test[-3:]")[2]["image"][..., 0], images[-1])
  assert source.records("test[10:12]")[0]["label"] == labels[10]
  _write_folder(tmp_path, corrupt=False)
  assert data.get_source("folder", data_dir=tmp_path).num_examples("train[2:5]") == 3
  for bad, match in (("test[2k]", "a slice is written NAME\\[START:STOP\\]"),
                     ("test[5:5]", "selects no example")):
    with pytest.raises(ValueError, match=match):
      source.num_examples(bad)


def test_image_folder_errors(tmp_path):
  with pytest.raises(ValueError, match="needs data_dir"):
    data.get_source("folder")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_source("folder", data_dir=tmp_path / "nope")
  (tmp_path / "train" / "empty_class").mkdir(parents=True)
  source = data.get_source("folder", data_dir=tmp_path)
  with pytest.raises(ValueError, match="holds no readable images"):
    source.num_examples("train")
  with pytest.raises(FileNotFoundError, match="no split folder 'val'"):
    source.num_examples("val")
  # A truncated JPEG passes the header check; verify="decode" skips it.
  good = tmp_path / "v" / "train" / "a"
  good.mkdir(parents=True)
  jpeg = _encode(np.zeros((16, 16, 3), np.uint8), "JPEG")
  (good / "ok.jpg").write_bytes(jpeg)
  (good / "cut.jpg").write_bytes(jpeg[:20])
  assert data.get_source("folder", data_dir=tmp_path / "v").num_examples("train") == 2
  assert data.get_source("folder", data_dir=tmp_path / "v",
                         verify="decode").num_examples("train") == 1


def _id_records(n, channels=1):
  """Records as tfds.data_source gives them with SkipDecoding: PNG bytes; pixel (0, 0) = id."""
  records = []
  for i in range(n):
    image = np.zeros((8, 8, channels), np.uint8)
    image[0, 0] = i
    records.append({"image": _encode(image, "PNG"), "label": i % 3})
  return records


def _mock_tfds(sizes):
  def as_data_source(self, split, decoders=None, **kw):
    del self, kw
    assert decoders  # images are left encoded: PIL decodes them in the input threads
    return _id_records(sizes[split], channels=3)
  return tfds.testing.mock_data(num_examples=1, as_data_source_fn=as_data_source)


def test_tfds_source_shards_eval_and_resume():
  plain = data.Preprocess(size=8, channels=3, crop="none", flip=False, randaugment=None,
                          erasing=0.0, crop_pct=1.0)
  with _mock_tfds({"train": 30, "test": 11}):
    source = data.get_source("cifar10")
    assert source.num_classes == 10 and source.num_examples("test") == 11
    ids = []
    for i in range(2):
      rows = _rows(data.eval_batches(source, "test", plain, local_batch=4, shard=(i, 2)))
      ids.append([r[0][0] for r in rows])
    assert sorted(ids[0] + ids[1]) == list(range(11)) and not set(ids[0]) & set(ids[1])
    kw = dict(local_batch=4, seed=5, shard=(1, 2))
    first = _take(data.train_batches(source, "train", plain, **kw), 5)  # 3 per epoch
    resumed = _take(data.train_batches(source, "train", plain, start_step=2, **kw), 3)
    for x, y in zip(first[2:], resumed):
      np.testing.assert_array_equal(x["image"], y["image"])
    assert {int(v) for b in first[:3] for v in b["image"][:, 0, 0, 0]} <= set(range(15, 30))
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset'"):
    data.get_source("no_such_dataset")


def test_tfds_unprepared_tfrecord_and_corrupt_records(tmp_path):
  plain = data.Preprocess(size=8, channels=3, crop="none", flip=False, randaugment=None,
                          erasing=0.0, crop_pct=1.0)
  source = data.get_source("cifar10", data_dir=tmp_path)
  with pytest.raises(FileNotFoundError, match="'cifar10' is not prepared in data_dir=.*array_rec"):
    source.num_examples("test")
  source = data.get_source("cifar10", data_dir=tmp_path)

  def tfrecord_only(*args, **kw):
    raise NotImplementedError("random access needs ArrayRecord")
  with mock.patch.object(source.builder, "as_data_source", tfrecord_only), \
      mock.patch.object(source.builder, "is_prepared", lambda: True):
    with pytest.raises(ValueError, match="prepared as .*not ArrayRecord.*convert_format"):
      source.num_examples("test")
  with _mock_tfds({"train": 8, "test": 8}):
    source = data.get_source("cifar10")
    source.records("test").data[5]["image"] = b"\x89PNG\r\n\x1a\n truncated"
    with pytest.raises(ValueError, match="cannot decode a cifar10 image"):  # budget 0: none
      list(data.eval_batches(source, "test", plain, local_batch=4, shard=(0, 1),
                             bad_budget=0.0))


def test_tensorflow_is_never_imported():
  import sys  # pylint: disable=g-import-not-at-top
  import tps_jax.trainer.loop  # pylint: disable=unused-import,g-import-not-at-top
  assert "tensorflow" not in sys.modules


def test_fashion_mnist_source_honours_data_dir(tmp_path, caplog):
  root = fashion_mnist.data_dir()
  for name in fashion_mnist.FILES["train"] + fashion_mnist.FILES["test"]:
    (tmp_path / name).write_bytes((root / name).read_bytes())
  # The copy's first test label is changed: the source must read the copy, not Debian's files.
  with gzip.open(root / fashion_mnist.FILES["test"][1]) as f:
    raw = bytearray(f.read())
  raw[8] = (raw[8] + 1) % 10
  with gzip.open(tmp_path / fashion_mnist.FILES["test"][1], "wb") as f:
    f.write(bytes(raw))
  with caplog.at_level(logging.INFO):
    source = data.get_source("fashion_mnist", data_dir=tmp_path)
  assert f"IDX files in {tmp_path}" in caplog.text
  assert source.records("test")[0]["label"] == raw[8]
  # A data_dir without the IDX files is read as a tfds copy, and says so when it is not one.
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="'fashion_mnist' is not prepared"):
    data.get_source("fashion_mnist", data_dir=tmp_path / "empty").num_examples("test")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.get_source("fashion_mnist", data_dir=tmp_path / "nope")


def test_preprocess_config_errors():
  with pytest.raises(ValueError, match="unknown crop 'centre'"):
    data.Preprocess(crop="centre")
  with pytest.raises(ValueError, match="mean has 2 values for 3 channels"):
    data.Preprocess(mean=(0.5, 0.5))
  with pytest.raises(ValueError, match="do not fill one batch"):
    data.steps_per_epoch(10, 8, 2)


def test_synthetic_source_is_seeded_noise_of_any_size():
  src = data.get_source("synthetic", num_classes=10, image_size=8, train_examples=100,
                        eval_examples=20)
  assert (src.num_classes, src.channels) == (10, 3)
  assert src.num_examples("train") == 100 and src.num_examples("validation[:5]") == 5
  recs = src.records("train")
  a, b = recs[7], src.records("train")[7]
  assert a["image"].shape == (8, 8, 3) and a["image"].dtype == np.uint8 and a["label"] == 7
  np.testing.assert_array_equal(a["image"], b["image"])  # the same image every call
  assert not np.array_equal(recs[8]["image"], a["image"])
  with pytest.raises(ValueError, match="synthetic has no split 'dev'"):
    src.num_examples("dev")
