"""Where examples come from: tfds datasets, image folders, and Fashion-MNIST.

A source serves one epoch of one process's shard of a split as a tf.data
dataset of raw records, and knows how to decode a record into a uint8 image
(H, W, C). The pipeline (`tps_jax.data.pipeline`) does the rest.

  get_source("fashion_mnist")             # tfds if prepared, else Debian's files
  get_source("cifar10", data_dir=...)     # any prepared tfds image dataset
  get_source("imagenet2012", data_dir=...)
  get_source("folder", data_dir=ROOT)     # ROOT/<split>/<class>/<image>

Shards are contiguous and even (as `tfds.even_splits`): process i of P reads
only its own part of the split.
"""

from __future__ import annotations

import os
import pathlib

from absl import logging
import numpy as np
import tensorflow as tf

from tps_jax.data import fashion_mnist

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF87a", b"GIF89a")


def shard_bounds(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of shard `index` of `count` over n examples (sizes differ by <= 1)."""
  if not 0 <= index < count:
    raise ValueError(f"shard index {index} is not in [0, {count}).")
  if n < count:
    raise ValueError(f"cannot split {n} examples over {count} processes.")
  return index * n // count, (index + 1) * n // count


class IndexedSource:
  """Examples addressable by index: an epoch is a permutation of the shard's indices."""
  num_classes: int
  channels: int

  def _columns(self, split: str) -> dict[str, np.ndarray]:
    """The split as numpy columns {"image": ..., "label": ...} of equal length."""
    raise NotImplementedError

  def _load(self, record):
    return record

  def decode(self, image):
    return image

  def num_examples(self, split: str) -> int:
    return len(self._columns(split)["label"])

  def epoch(self, split: str, shard: tuple[int, int], *, epoch: int, seed: int,
            shuffle: bool, skip: int = 0) -> tf.data.Dataset:
    """One epoch of a shard, from its `skip`-th record on (skipping reads nothing)."""
    columns = self._columns(split)
    indices = np.arange(*shard_bounds(len(columns["label"]), *shard))
    if shuffle:
      indices = np.random.default_rng([seed, epoch]).permutation(indices)
    indices = indices[skip:]
    ds = tf.data.Dataset.from_tensor_slices({k: v[indices] for k, v in columns.items()})
    return ds.map(self._load, num_parallel_calls=tf.data.AUTOTUNE)


class ArraySource(IndexedSource):
  """In-memory uint8 images (N, H, W[, C]) and int labels, per split."""

  def __init__(self, splits: dict[str, tuple[np.ndarray, np.ndarray]], num_classes: int,
               name: str = "arrays"):
    self.name, self.num_classes = name, num_classes
    self._arrays = {}
    for split, (images, labels) in splits.items():
      images = np.asarray(images)
      if images.ndim == 3:
        images = images[..., None]
      if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"{name}/{split}: images must be uint8 (N, H, W[, C]), got "
                         f"{images.dtype} {images.shape}.")
      if len(labels) != len(images):
        raise ValueError(f"{name}/{split}: {len(images)} images but {len(labels)} labels.")
      self._arrays[split] = {"image": images, "label": np.asarray(labels, np.int32)}
    self.channels = next(iter(self._arrays.values()))["image"].shape[-1]

  def _columns(self, split):
    if split not in self._arrays:
      raise ValueError(f"{self.name} has no split {split!r}; it has {sorted(self._arrays)}.")
    return self._arrays[split]


def _looks_like_image(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return False
  return any(head.startswith(m) for m in _MAGIC)


def _decodes(path: pathlib.Path) -> bool:
  try:
    tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
    return True
  except (tf.errors.InvalidArgumentError, tf.errors.OpError):
    return False


class FolderSource(IndexedSource):
  """A folder of class sub-folders of images: ROOT/<split>/<class>/<file>.

  Class ids are the sorted class-folder names, the same in every split. Files
  that are not images (by their first bytes) are skipped and counted in the
  log; `verify="decode"` also decodes every file once to skip corrupt ones.
  """

  def __init__(self, root: str | os.PathLike, *, verify: str = "header", channels: int = 3):
    self.root, self.name = pathlib.Path(root), f"folder:{root}"
    if verify not in ("header", "decode"):
      raise ValueError(f"unknown verify mode {verify!r}; expected 'header' or 'decode'.")
    if not self.root.is_dir():
      raise FileNotFoundError(f"image folder {self.root} does not exist.")
    self.verify, self.channels = verify, channels
    self._files: dict[str, dict[str, np.ndarray]] = {}
    self.classes = None
    self.skipped: dict[str, list[str]] = {}  # split -> files left out

  def _split_dir(self, split):
    path = self.root / split
    if not path.is_dir():
      have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
      raise FileNotFoundError(f"image folder {self.root} has no split folder {split!r} "
                              f"(it has {have}); expected ROOT/<split>/<class>/<image>.")
    return path

  def _columns(self, split):
    if split in self._files:
      return self._files[split]
    path = self._split_dir(split)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if self.classes is None:
      self.classes = classes
    elif classes != self.classes:
      raise ValueError(f"split {split!r} of {self.root} has classes {classes}, but another "
                       f"split has {self.classes}.")
    files, labels, skipped = [], [], []
    for label, name in enumerate(classes):
      for f in sorted((path / name).rglob("*")):
        if not f.is_file() or f.suffix.lower() not in IMAGE_EXTENSIONS:
          continue
        if _looks_like_image(f) and (self.verify != "decode" or _decodes(f)):
          files.append(str(f))
          labels.append(label)
        else:
          skipped.append(str(f))
    if skipped:
      logging.warning("skipped %d unreadable image file(s) in %s: %s", len(skipped), path,
                      ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
    if not files:
      raise ValueError(f"image folder {path} holds no readable images in class sub-folders "
                       f"(looked for {', '.join(IMAGE_EXTENSIONS)}).")
    self.skipped[split] = skipped
    self._files[split] = {"image": np.array(files), "label": np.array(labels, np.int32)}
    return self._files[split]

  @property
  def num_classes(self):
    if self.classes is None:
      for split in ("train", "val", "validation", "test"):
        if (self.root / split).is_dir():
          self._columns(split)
          break
      else:
        raise FileNotFoundError(f"image folder {self.root} has no train/val/test split folder.")
    return len(self.classes)

  def _load(self, record):
    return {"image": tf.io.read_file(record["image"]), "label": record["label"]}

  def decode(self, image):
    return tf.ensure_shape(
        tf.io.decode_image(image, channels=self.channels, expand_animations=False),
        (None, None, self.channels))


class TfdsSource:
  """A prepared tfds image-classification dataset (records decoded after skipping)."""

  def __init__(self, name: str, data_dir: str | os.PathLike | None = None,
               shuffle_buffer: int = 10_000):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f"unknown dataset {name!r}: not a tfds dataset, 'folder' or "
                       f"'fashion_mnist'.") from e
    self.name, self.data_dir, self.shuffle_buffer = name, data_dir, shuffle_buffer
    keys = self.builder.info.supervised_keys
    if not keys:
      raise ValueError(f"tfds dataset {name!r} has no supervised (image, label) keys.")
    self.image_key, self.label_key = keys[0], keys[1]
    image_feature = self.builder.info.features[self.image_key]
    self.channels = image_feature.shape[-1] or 3
    self.num_classes = self.builder.info.features[self.label_key].num_classes
    self._decode = image_feature.decode_example
    self._counts = {}

  def _dataset(self, split, **kw):
    try:
      return self.builder.as_dataset(
          split=split, decoders={self.image_key: self._tfds.decode.SkipDecoding()}, **kw)
    except AssertionError as e:  # tfds' "could not find data" when not prepared
      raise FileNotFoundError(
          f"tfds dataset {self.name!r} is not prepared in data_dir={self.data_dir!r}. Prepare "
          f"it with `tfds build {self.name} --data_dir=DIR` (for imagenet2012 put the "
          f"ILSVRC tar files in DIR/downloads/manual first).") from e

  def num_examples(self, split):
    if split not in self._counts:
      try:
        self._counts[split] = self.builder.info.splits[split].num_examples
      except KeyError:  # no split metadata (e.g. tfds.testing.mock_data): count records
        self._counts[split] = int(self._dataset(split).reduce(0, lambda n, _: n + 1))
    return self._counts[split]

  def epoch(self, split, shard, *, epoch, seed, shuffle, skip=0):
    """One epoch of a shard; skipped records are read but not decoded."""
    shard_bounds(self.num_examples(split), *shard)  # a clear error for a bad shard
    sub = self._tfds.even_splits(split, n=shard[1])[shard[0]]
    read = self._tfds.ReadConfig(shuffle_seed=seed + epoch, shuffle_reshuffle_each_iteration=False)
    ds = self._dataset(sub, shuffle_files=shuffle, read_config=read)
    if shuffle:
      ds = ds.shuffle(self.shuffle_buffer, seed=seed * 7919 + epoch,
                      reshuffle_each_iteration=False)
    return ds.skip(skip).map(lambda ex: {"image": ex[self.image_key],
                              "label": tf.cast(ex[self.label_key], tf.int32)})

  def decode(self, image):
    return self._decode(image)


def fashion_mnist_source(data_dir: str | os.PathLike | None = None, prefer: str = "auto"):
  """Fashion-MNIST: a prepared tfds copy in `data_dir` if there is one, else the IDX files.

  prefer: "auto", "tfds" or "idx". The IDX files are the Debian package
  `dataset-fashion-mnist` (or $TPS_FASHION_MNIST_DIR); tfds generates its copy
  from the same files, so both give the same 70 000 examples in the same order.
  """
  if prefer not in ("auto", "tfds", "idx"):
    raise ValueError(f"unknown Fashion-MNIST source {prefer!r}; expected auto, tfds or idx.")
  if prefer != "idx":
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if builder.is_prepared() or prefer == "tfds":
      return TfdsSource("fashion_mnist", data_dir)
  splits = {s: fashion_mnist.load(s) for s in ("train", "test")}  # $TPS_FASHION_MNIST_DIR
  return ArraySource(splits, num_classes=len(fashion_mnist.CLASSES), name="fashion_mnist")


def get_source(name: str, *, data_dir: str | os.PathLike | None = None, **kw):
  """Resolves a dataset name: "fashion_mnist", "folder" (with data_dir) or a tfds name."""
  if name == "fashion_mnist":
    return fashion_mnist_source(data_dir, **kw)
  if name == "folder":
    if data_dir is None:
      raise ValueError("dataset 'folder' needs data_dir=ROOT (ROOT/<split>/<class>/<image>).")
    return FolderSource(data_dir, **kw)
  if data_dir is not None and not pathlib.Path(data_dir).is_dir():
    raise FileNotFoundError(f"data_dir {data_dir} does not exist.")
  return TfdsSource(name, data_dir, **kw)
