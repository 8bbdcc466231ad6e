"""Batches for training and evaluation, per JAX process, assembled into global arrays.

  train_batches(source, "train", preprocess, local_batch=..., seed=..., start_step=s)
      endless (B_local, ...) numpy batches. Epochs are reshuffled by (seed, epoch);
      every process takes the same number of batches per epoch, so multi-host
      steps stay in lockstep. The stream is a pure function of (seed, step): a
      resumed run passes `start_step` and gets exactly the batches it would have
      seen, with nothing decoded for the skipped part.
  eval_batches(source, "test", preprocess, local_batch=...)
      every example of the split exactly once across processes; the last
      batches are padded and `mask` says which rows are real.
  device_prefetch(batches, sharding)
      global jax.Arrays built with `jax.make_array_from_process_local_data`,
      a few steps ahead, on a background thread.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf

from tps_jax.data import preprocess as preprocess_lib

Batch = dict[str, np.ndarray]


def _process_shard(shard):
  return shard if shard is not None else (jax.process_index(), jax.process_count())


def local_batch_size(global_batch: int, sharding: jax.sharding.NamedSharding | None = None,
                     process_count: int | None = None) -> int:
  """This process's share of `global_batch`, after checking that it divides evenly."""
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
  steps = (num_examples // process_count) // local_batch
  if steps == 0:
    raise ValueError(f"{num_examples} examples over {process_count} process(es) do not fill "
                     f"one batch of {local_batch}.")
  return steps


def _element_seed(seed: int, process: int, epoch: int):
  base = tf.constant([seed * 1_000_003 + process, epoch * 2**31], tf.int64)
  return lambda position: base + tf.stack([tf.constant(0, tf.int64), position])


def _options():
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def train_batches(source, split: str, preprocess: preprocess_lib.Preprocess, *,
                  local_batch: int, seed: int, start_step: int = 0,
                  shard: tuple[int, int] | None = None) -> Iterator[Batch]:
  """Endless training batches {"image": f32 (B, S, S, C), "label": i32 (B,)} from `start_step`."""
  index, count = _process_shard(shard)
  per_epoch = steps_per_epoch(source.num_examples(split), local_batch, count)
  epoch, step = divmod(start_step, per_epoch)
  while True:
    skip = step * local_batch
    ds = source.epoch(split, (index, count), epoch=epoch, seed=seed, shuffle=True, skip=skip)
    ds = ds.take((per_epoch - step) * local_batch).enumerate(start=skip)
    element_seed = _element_seed(seed, index, epoch)

    def process(position, record, element_seed=element_seed):
      image = preprocess_lib.train_image(source.decode(record["image"]),
                                         element_seed(position), preprocess)
      return {"image": image, "label": record["label"]}

    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(2).with_options(_options())
    yield from ds.as_numpy_iterator()
    epoch, step = epoch + 1, 0


def eval_steps(num_examples: int, local_batch: int, process_count: int) -> int:
  """Batches per process that cover the largest shard (every process runs this many)."""
  return math.ceil(math.ceil(num_examples / process_count) / local_batch)


def eval_batches(source, split: str, preprocess: preprocess_lib.Preprocess, *,
                 local_batch: int, shard: tuple[int, int] | None = None) -> Iterator[Batch]:
  """Each example of this process's shard once, then padding rows with mask False."""
  index, count = _process_shard(shard)
  steps = eval_steps(source.num_examples(split), local_batch, count)
  ds = source.epoch(split, (index, count), epoch=0, seed=0, shuffle=False)
  ds = ds.map(lambda r: {"image": preprocess_lib.eval_image(source.decode(r["image"]), preprocess),
                         "label": r["label"], "mask": tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE)
  size, channels = preprocess.size, preprocess.channels
  pad = tf.data.Dataset.from_tensors({
      "image": tf.zeros((size, size, channels), tf.float32),
      "label": tf.constant(0, tf.int32), "mask": tf.constant(False)}).repeat()
  ds = ds.concatenate(pad).take(steps * local_batch).batch(local_batch)
  yield from ds.prefetch(2).with_options(_options()).as_numpy_iterator()


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
