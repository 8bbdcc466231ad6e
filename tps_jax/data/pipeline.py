"""Batches for training and evaluation, per JAX process, on grain; global arrays for jit.

  train_batches(source, "train", preprocess, local_batch=..., seed=..., start_step=s)
      endless {"image": uint8 (B_local, S, S, C), "label": int32 (B_local,)}.
      Epochs are reshuffled by (seed, epoch); every process takes the same
      number of batches per epoch, so multi-host steps stay in lockstep. The
      stream is a pure function of (seed, step): grain reads it by random
      access, so a resumed run passes `start_step` and gets exactly the batches
      it would have seen, with nothing read for the skipped part (no iterator
      state to checkpoint).
  eval_batches(source, "test", preprocess, local_batch=...)
      every example of the split exactly once across processes; the last
      batches are padded and `mask` says which rows are real.
  device_prefetch(batches, sharding)
      global jax.Arrays built with `jax.make_array_from_process_local_data`,
      a few steps ahead, on a background thread.

An image that cannot be decoded (a corrupt file or record) does not end the run:
in training its example is replaced by the next decodable one of the shard (a
deterministic neighbour, so a resumed run sees the same batches), in evaluation
it is masked out; each is named in the log once and counted, and the pipeline
fails only when a split's count passes `bad_budget` (0.1% of the split by
default, and at least one image unless the budget is 0).

The host decodes, crops, resizes and flips (`preprocess`) in `threads` threads
(PIL releases the GIL) or, with `workers` > 0, in grain worker processes; the
batches come out in the same order either way. RandAugment, normalisation,
random erasing and mixing run on the device (`augment`, `mixing`).
"""

from __future__ import annotations

import collections
import math
import os
import threading
from typing import Iterator

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from tps_jax.data import preprocess as preprocess_lib
from tps_jax.data.sources import shard_bounds

Batch = dict[str, np.ndarray]
_MAX_EPOCHS = 1_000_000  # the endless stream is this many epochs long
BAD_BUDGET = 0.001  # undecodable images tolerated per split, as a fraction of it
_NEIGHBOURS = 64  # at most this many undecodable images in a row are stepped over


class BadImages:
  """Counts a split's undecodable images (in this process): names each in the log once and
  raises once there are more than `budget` x the split's size (at least one, for a budget
  above 0: 0.1% of a small split would otherwise round down to none)."""

  def __init__(self, split: str, total: int, budget: float = BAD_BUDGET):
    if not 0 <= budget <= 1:
      raise ValueError(f"bad image budget must be a fraction in [0, 1], got {budget}.")
    self.split, self.total, self.budget = split, total, budget
    self.limit = max(1, int(budget * total)) if budget > 0 else 0
    self.seen: set[int] = set()
    self._lock = threading.Lock()

  def __getstate__(self):  # grain's worker processes get a pickled copy: no lock in it
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def report(self, index: int, record, error: Exception) -> None:
    image = record.get("image") if isinstance(record, dict) else None
    name = str(image) if isinstance(image, (str, os.PathLike)) else f"record {index}"
    with self._lock:
      new = index not in self.seen
      self.seen.add(index)
      count = len(self.seen)
    if count > self.limit:
      raise ValueError(
          f"{count} image(s) of split {self.split!r} cannot be decoded, more than its budget "
          f"of {self.limit} ({self.budget:.2%} of {self.total}; input.bad_image_budget); the "
          f"latest, {name}: {error}") from error
    if new:
      logging.warning("split %r: %s cannot be decoded (%s); %d of a budget of %d: it is "
                      "replaced by a neighbour in training and left out of evaluation.",
                      self.split, name, error, count, self.limit)


def _check_batch(batch) -> None:
  if int(batch) != batch or batch < 1:
    raise ValueError(f"batch size must be a positive integer, got {batch!r}.")


def _process_shard(shard):
  return shard if shard is not None else (jax.process_index(), jax.process_count())


def local_batch_size(global_batch: int, sharding: jax.sharding.NamedSharding | None = None,
                     process_count: int | None = None) -> int:
  """This process's share of `global_batch`, after checking that it divides evenly."""
  _check_batch(global_batch)
  process_count = jax.process_count() if process_count is None else process_count
  if sharding is not None:
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if global_batch % shards:
      raise ValueError(f"global batch size {global_batch} does not divide over the {shards} "
                       f"devices of mesh axes {axes}; use a multiple of {shards}.")
  if global_batch % process_count:
    raise ValueError(f"global batch size {global_batch} does not divide over "
                     f"{process_count} processes.")
  return global_batch // process_count


def steps_per_epoch(num_examples: int, local_batch: int, process_count: int) -> int:
  """Full batches per epoch, the same on every process (the smallest shard decides)."""
  _check_batch(local_batch)
  steps = (num_examples // process_count) // local_batch
  if steps == 0:
    raise ValueError(f"{num_examples} examples over {process_count} process(es) do not fill "
                     f"one batch of {local_batch}.")
  return steps


class _EpochOrder:
  """Position in this process's endless stream -> index into the split.

  Epoch e is a permutation of the shard [lo, hi) drawn from (seed, e), of
  which the first `used` entries are read (whole batches only). grain's
  reader threads call this concurrently, and at an epoch boundary some read
  epoch e while others read e + 1: the last `cached` epochs' permutations are
  kept under a lock, so each is drawn once (a one-entry cache shared by the
  threads redrew a permutation, 1.28M entries on ImageNet, almost every row
  there: benchmarks/input_pipeline.py --boundary).
  """

  def __init__(self, lo: int, hi: int, used: int, seed: int, cached: int = 3):
    self.lo, self.hi, self.used, self.seed, self.cached = lo, hi, used, seed, cached
    self._orders: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()
    self.draws = 0  # permutations drawn so far (the benchmark and tests read it)

  def __len__(self):
    return self.used * _MAX_EPOCHS

  def __getstate__(self):  # grain's worker processes get a pickled copy: no lock, no cache
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_orders")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._orders = collections.OrderedDict()
    self._lock = threading.Lock()

  def order(self, epoch: int) -> np.ndarray:
    """Epoch `epoch`'s permutation of [lo, hi)."""
    with self._lock:
      order = self._orders.get(epoch)
      if order is None:
        order = np.random.default_rng([self.seed, epoch]).permutation(np.arange(self.lo,
                                                                                self.hi))
        self.draws += 1
        self._orders[epoch] = order
        while len(self._orders) > self.cached:
          self._orders.popitem(last=False)
      else:
        self._orders.move_to_end(epoch)
      return order

  def __getitem__(self, position: int) -> int:
    epoch, k = divmod(int(position), self.used)
    return int(self.order(epoch)[k])


def _read_options(threads: int | None, ahead: int) -> grain.ReadOptions:
  threads = threads if threads else min(16, os.cpu_count() or 1)
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(ahead, threads))


def _iterate(ds: grain.MapDataset, threads, workers: int, ahead: int = 2):
  it = ds.to_iter_dataset(_read_options(threads, ahead))
  if workers:
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app
      flags.FLAGS.mark_as_parsed()   # their defaults apply
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=ahead))
  return iter(it)


def train_dataset(source, split: str, preprocess: preprocess_lib.Preprocess, *,
                  local_batch: int, seed: int, shard: tuple[int, int] | None = None,
                  bad_budget: float = BAD_BUDGET) -> grain.MapDataset:
  """The endless stream of this process's training batches as a grain MapDataset."""
  index, count = _process_shard(shard)
  records = source.records(split)
  lo, hi = shard_bounds(len(records), index, count)
  per_epoch = steps_per_epoch(len(records), local_batch, count)
  order = _EpochOrder(lo, hi, per_epoch * local_batch, seed)
  bad = BadImages(split, len(records), bad_budget)

  def process(position, record_index):
    rng = np.random.default_rng([seed, index, position])
    for step in range(min(_NEIGHBOURS, hi - lo)):  # this example, or the next decodable one
      i = lo + (record_index - lo + step) % (hi - lo)
      record = records[i]
      try:
        decoded = source.decode(record["image"])
      except ValueError as e:  # undecodable bytes; a failing read (OSError) is raised as it is
        bad.report(i, record, e)
        continue
      image = preprocess_lib.train_image(decoded, rng, preprocess)
      return {"image": image, "label": np.int32(record["label"])}
    raise ValueError(f"split {split!r}: {_NEIGHBOURS} images in a row from index "
                     f"{record_index} cannot be decoded.")

  return (grain.MapDataset.source(order).map_with_index(process)
          .batch(local_batch, drop_remainder=True))


def train_batches(source, split: str, preprocess: preprocess_lib.Preprocess, *,
                  local_batch: int, seed: int, start_step: int = 0,
                  shard: tuple[int, int] | None = None, threads: int | None = None,
                  workers: int = 0, bad_budget: float = BAD_BUDGET) -> Iterator[Batch]:
  """Endless training batches {"image": uint8 (B, S, S, C), "label": i32 (B,)} from `start_step`."""
  ds = train_dataset(source, split, preprocess, local_batch=local_batch, seed=seed, shard=shard,
                     bad_budget=bad_budget)
  return _iterate(ds[start_step:], threads, workers)


def eval_steps(num_examples: int, local_batch: int, process_count: int) -> int:
  """Batches per process that cover the largest shard (every process runs this many)."""
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def eval_batches(source, split: str, preprocess: preprocess_lib.Preprocess, *,
                 local_batch: int, shard: tuple[int, int] | None = None,
                 threads: int | None = None, workers: int = 0,
                 bad_budget: float = BAD_BUDGET) -> Iterator[Batch]:
  """Each example of this process's shard once, then padding rows with mask False (and an
  undecodable example masked out, within `bad_budget`)."""
  _check_batch(local_batch)
  index, count = _process_shard(shard)
  records = source.records(split)
  lo, hi = shard_bounds(len(records), index, count)
  steps = eval_steps(len(records), local_batch, count)
  p = preprocess
  blank = np.zeros((p.size, p.size, p.channels), np.uint8)
  bad = BadImages(split, len(records), bad_budget)

  def process(position):
    padding = {"image": blank, "label": np.int32(0), "mask": np.bool_(False)}
    if lo + position >= hi:
      return padding
    record = records[lo + position]
    try:
      decoded = source.decode(record["image"])
    except ValueError as e:  # undecodable bytes; a failing read (OSError) is raised as it is
      bad.report(lo + position, record, e)
      return padding
    image = preprocess_lib.eval_image(decoded, p)
    return {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(True)}

  ds = grain.MapDataset.range(steps * local_batch).map(process).batch(local_batch)
  return _iterate(ds, threads, workers)


def to_global(batch: Batch, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """This process's rows -> global arrays laid out by `sharding` (batch on axis 0)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def device_prefetch(batches: Iterator[Batch], sharding: jax.sharding.Sharding,
                    size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Global arrays built `size` batches ahead on a background thread.

  An error in the input pipeline is raised in the consumer, at the batch where
  it happened. Closing the returned generator (or leaving a `for` loop over it)
  stops the thread and closes `batches`, so no reader outlives the loop.
  """
  queue: collections.deque = collections.deque()
  ready = threading.Semaphore(0)
  room = threading.Semaphore(size)
  done = object()
  stop = threading.Event()

  def produce():
    try:
      for batch in batches:
        room.acquire()
        if stop.is_set():
          break
        queue.append(to_global(batch, sharding))
        ready.release()
      else:
        queue.append(done)
        ready.release()
    except BaseException as e:  # pylint: disable=broad-except
      queue.append(e)
      ready.release()
    finally:
      if hasattr(batches, "close"):
        batches.close()

  thread = threading.Thread(target=produce, daemon=True, name="device_prefetch")
  thread.start()
  try:
    while True:
      ready.acquire()
      item = queue.popleft()
      if item is done:
        return
      if isinstance(item, BaseException):
        raise item
      room.release()
      yield item
  finally:
    stop.set()
    room.release()
    thread.join(timeout=60)
