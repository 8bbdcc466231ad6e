"""Where examples come from: tfds datasets (ArrayRecord), image folders, arrays, Fashion-MNIST.

A source gives random access to the records of a split (`records(split)`: a
sequence with `len` and `[i]` -> {"image": raw, "label": int}) and decodes a
raw image into uint8 (H, W, C) (`decode`). Nothing here imports TensorFlow.

  get_source("fashion_mnist")             # Debian's IDX files (or a tfds ArrayRecord copy)
  get_source("cifar10", data_dir=...)     # any tfds image dataset prepared as ArrayRecord
  get_source("imagenet2012", data_dir=...)
  get_source("folder", data_dir=ROOT)     # ROOT/<split>/<class>/<image>

Shards are contiguous and even (as `tfds.even_splits`): process i of P reads
only its own part of the split (`shard_bounds`).
"""

from __future__ import annotations

import io
import os
import pathlib
import re
from typing import Any, Sequence

from absl import logging
import numpy as np
from PIL import Image

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


def decode_image_bytes(raw: bytes, channels: int, what: str = "image") -> np.ndarray:
  """Encoded image bytes (JPEG, PNG, ...) -> uint8 (H, W, channels), via PIL."""
  try:
    with Image.open(io.BytesIO(raw)) as image:
      image = image.convert("L" if channels == 1 else "RGB")
      array = np.asarray(image)
  except (OSError, ValueError, SyntaxError) as e:
    raise ValueError(f"cannot decode {what}: {e}") from e
  return array[..., None] if array.ndim == 2 else array


_SLICE = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def split_slice(split: str) -> tuple[str, slice]:
  """"test[:2000]" -> ("test", slice(None, 2000)); "test" -> ("test", slice(None)).

  The tfds split-slicing syntax with example counts (tfds sources take it natively)."""
  m = _SLICE.match(split)
  if not m:
    if "[" in split:
      raise ValueError(f"split {split!r}: a slice is written NAME[START:STOP] with integer "
                       f"example counts, e.g. 'test[:2000]'.")
    return split, slice(None)
  num = lambda v: int(v) if v else None
  return m["name"], slice(num(m["start"]), num(m["stop"]))


def _sliced(columns: tuple[np.ndarray, np.ndarray], sl: slice, split: str):
  images, labels = columns
  images, labels = images[sl], labels[sl]
  if not len(labels):
    raise ValueError(f"split {split!r} selects no example.")
  return images, labels


class ArraySource:
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
      self._arrays[split] = (images, np.asarray(labels, np.int32))
    self.channels = next(iter(self._arrays.values()))[0].shape[-1]

  def _split(self, split):
    name, sl = split_slice(split)
    if name not in self._arrays:
      raise ValueError(f"{self.name} has no split {name!r}; it has {sorted(self._arrays)}.")
    return _sliced(self._arrays[name], sl, split)

  def num_examples(self, split: str) -> int:
    return len(self._split(split)[1])

  def records(self, split: str) -> Sequence[dict[str, Any]]:
    return _Columns(*self._split(split))

  def decode(self, image):
    return image


class _Columns:
  """Random access over parallel (image, label) columns."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def _looks_like_image(path: pathlib.Path) -> bool:
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError:
    return False
  return any(head.startswith(m) for m in _MAGIC)


def _decodes(path: pathlib.Path) -> bool:
  try:
    with Image.open(path) as image:
      image.load()
    return True
  except (OSError, ValueError, SyntaxError):
    return False


class FolderSource:
  """A folder of class sub-folders of images: ROOT/<split>/<class>/<file>.

  Class ids are the sorted class-folder names, the same in every split. Files
  that are not images (by their first bytes) are skipped and counted in the
  log; `verify="decode"` also decodes every file once to skip corrupt ones. A
  corrupt file that passes the check fails at decode with its path named.
  """

  def __init__(self, root: str | os.PathLike, *, verify: str = "header", channels: int = 3):
    self.root, self.name = pathlib.Path(root), f"folder:{root}"
    if verify not in ("header", "decode"):
      raise ValueError(f"unknown verify mode {verify!r}; expected 'header' or 'decode'.")
    if not self.root.is_dir():
      raise FileNotFoundError(f"image folder {self.root} does not exist.")
    self.verify, self.channels = verify, channels
    self._files: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self.classes = None
    self.skipped: dict[str, list[str]] = {}  # split -> files left out

  def _split_dir(self, split):
    path = self.root / split
    if not path.is_dir():
      have = sorted(p.name for p in self.root.iterdir() if p.is_dir())
      raise FileNotFoundError(f"image folder {self.root} has no split folder {split!r} "
                              f"(it has {have}); expected ROOT/<split>/<class>/<image>.")
    return path

  def _split(self, split):
    split, sl = split_slice(split)
    if split in self._files:
      return _sliced(self._files[split], sl, split)
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
    self._files[split] = (np.array(files), np.array(labels, np.int32))
    return _sliced(self._files[split], sl, split)

  def num_examples(self, split: str) -> int:
    return len(self._split(split)[1])

  def records(self, split: str) -> Sequence[dict[str, Any]]:
    return _Columns(*self._split(split))

  @property
  def num_classes(self):
    if self.classes is None:
      for split in ("train", "val", "validation", "test"):
        if (self.root / split).is_dir():
          self._split(split)
          break
      else:
        raise FileNotFoundError(f"image folder {self.root} has no train/val/test split folder.")
    return len(self.classes)

  def decode(self, path) -> np.ndarray:
    try:
      raw = pathlib.Path(str(path)).read_bytes()
    except OSError as e:
      raise FileNotFoundError(f"cannot read image file {path}: {e}") from e
    return decode_image_bytes(raw, self.channels, what=f"image file {path}")


TFRECORD_HELP = (
    "tps_jax reads tfds datasets through tfds.data_source (ArrayRecord, random access, no "
    "TensorFlow). Prepare one with `tfds build {name} --data_dir=DIR "
    "--file_format=array_record` (needs TensorFlow once, on any machine; for imagenet2012 "
    "put the ILSVRC tar files in DIR/downloads/manual first). A copy already prepared as "
    "TFRecord converts with `tfds convert_format --dataset_version_dir=DIR/{name}/<version> "
    "--out_file_format=array_record --out_dir=NEW_DIR/{name}/<version>`.")


class TfdsSource:
  """A tfds image-classification dataset prepared as ArrayRecord, read with random access.

  Images come out of the records still encoded (`SkipDecoding`) and are
  decoded by PIL in the input workers, so decoding runs in parallel and
  TensorFlow is never imported.
  """

  def __init__(self, name: str, data_dir: str | os.PathLike | None = None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(f"unknown dataset {name!r}: not a tfds dataset, 'folder' or "
                       f"'fashion_mnist'.") from e
    self.name, self.data_dir = name, data_dir
    keys = self.builder.info.supervised_keys
    if not keys:
      raise ValueError(f"tfds dataset {name!r} has no supervised (image, label) keys.")
    self.image_key, self.label_key = keys[0], keys[1]
    image_feature = self.builder.info.features[self.image_key]
    self.channels = image_feature.shape[-1] or 3
    self.num_classes = self.builder.info.features[self.label_key].num_classes
    self._records = {}

  def records(self, split: str) -> Sequence[dict[str, Any]]:
    if split in self._records:
      return self._records[split]
    tfds = self._tfds
    try:
      records = self.builder.as_data_source(
          split=split, decoders={self.image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      if not self.builder.is_prepared():
        raise FileNotFoundError(
            f"tfds dataset {self.name!r} is not prepared in data_dir={self.data_dir!r}. "
            + TFRECORD_HELP.format(name=self.name)) from e
      file_format = str(getattr(self.builder.info, "file_format", "") or "")
      if "array_record" not in file_format.lower():
        raise ValueError(
            f"tfds dataset {self.name!r} in data_dir={self.data_dir!r} is prepared as "
            f"{file_format or 'TFRecord'}, not ArrayRecord. "
            + TFRECORD_HELP.format(name=self.name)) from e
      raise ValueError(f"tfds dataset {self.name!r}: cannot read split {split!r}: {e}") from e
    self._records[split] = _TfdsRecords(records, self.image_key, self.label_key)
    return self._records[split]

  def num_examples(self, split: str) -> int:
    return len(self.records(split))

  def decode(self, raw) -> np.ndarray:
    return decode_image_bytes(bytes(raw), self.channels, what=f"a {self.name} image")


class _TfdsRecords:
  """tfds records -> {"image": encoded bytes, "label": int}."""

  def __init__(self, records, image_key, label_key):
    self.data, self.image_key, self.label_key = records, image_key, label_key

  def __len__(self):
    return len(self.data)

  def __getitem__(self, i):
    record = self.data[int(i)]
    return {"image": record[self.image_key], "label": np.int32(record[self.label_key])}


def fashion_mnist_source(data_dir: str | os.PathLike | None = None, prefer: str = "auto"):
  """Fashion-MNIST from the IDX files, or from a tfds ArrayRecord copy.

  data_dir: a folder holding the four IDX files, or a tfds data_dir with a
    prepared `fashion_mnist`; None reads Debian's `dataset-fashion-mnist`
    (or $TPS_FASHION_MNIST_DIR).
  prefer: "auto" (IDX files where data_dir has them, else tfds), "idx" or "tfds".
  Both give the same 70 000 examples in the same order; the choice is logged.
  """
  if prefer not in ("auto", "tfds", "idx"):
    raise ValueError(f"unknown Fashion-MNIST source {prefer!r}; expected auto, tfds or idx.")
  idx_dir = fashion_mnist.data_dir(data_dir)
  has_idx = all((idx_dir / f).exists() for f in fashion_mnist.FILES["train"])
  if prefer == "tfds" or (prefer == "auto" and data_dir is not None and not has_idx):
    if data_dir is not None and not pathlib.Path(data_dir).is_dir():
      raise FileNotFoundError(f"Fashion-MNIST data_dir {data_dir} does not exist.")
    logging.info("Fashion-MNIST: tfds copy in %s", data_dir)
    return TfdsSource("fashion_mnist", data_dir)
  splits = {s: fashion_mnist.load(s, data_dir) for s in ("train", "test")}
  logging.info("Fashion-MNIST: IDX files in %s", idx_dir)
  return ArraySource(splits, num_classes=len(fashion_mnist.CLASSES), name="fashion_mnist")


class SyntheticSource:
  """Seeded random uint8 images with labels `i % num_classes`: no files, any size (speed and
  compile checks; the model learns nothing from them). Image i of a split is the same on
  every call and every process."""

  def __init__(self, num_classes: int = 1000, image_size: int = 224, channels: int = 3,
               train_examples: int = 1_281_167, eval_examples: int = 50_000, seed: int = 0):
    self.name, self.num_classes, self.channels = "synthetic", int(num_classes), int(channels)
    self.image_size, self.seed = int(image_size), int(seed)
    self._sizes = {"train": int(train_examples), "validation": int(eval_examples),
                   "test": int(eval_examples)}

  def _split(self, split) -> range:
    name, sl = split_slice(split)
    if name not in self._sizes:
      raise ValueError(f"synthetic has no split {name!r}; it has {sorted(self._sizes)}.")
    return range(self._sizes[name])[sl]

  def num_examples(self, split: str) -> int:
    return len(self._split(split))

  def records(self, split: str) -> Sequence[dict[str, Any]]:
    return _SyntheticRecords(self, self._split(split))

  def decode(self, image):
    return image


class _SyntheticRecords:
  def __init__(self, source: SyntheticSource, indices: range):
    self.source, self.indices = source, indices

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    i, s = self.indices[i], self.source
    image = np.random.default_rng((s.seed, i)).integers(
        0, 256, (s.image_size, s.image_size, s.channels), np.uint8)
    return {"image": image, "label": np.int32(i % s.num_classes)}


def get_source(name: str, *, data_dir: str | os.PathLike | None = None, **kw):
  """Resolves a dataset name: "fashion_mnist", "folder" (with data_dir), "synthetic" (seeded
  noise, `SyntheticSource`'s options) or a tfds name."""
  if name == "fashion_mnist":
    return fashion_mnist_source(data_dir, **kw)
  if name == "synthetic":
    return SyntheticSource(**kw)
  if name == "folder":
    if data_dir is None:
      raise ValueError("dataset 'folder' needs data_dir=ROOT (ROOT/<split>/<class>/<image>).")
    return FolderSource(data_dir, **kw)
  if data_dir is not None and not pathlib.Path(data_dir).is_dir():
    raise FileNotFoundError(f"data_dir {data_dir} does not exist.")
  return TfdsSource(name, data_dir, **kw)
