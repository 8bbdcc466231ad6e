"""The train state and its Orbax checkpoints.

  state = {"step": int32 (), "params": ..., "opt_state": ..., "rng": uint32 key data}

`Checkpoints(workdir)` saves asynchronously every N steps, keeps the last K,
and writes each step atomically (Orbax renames a finished temporary
directory), so a killed run restarts from its last complete step. Restoring
takes the target shardings, so a run resumes onto a different mesh.

Orbax does not checksum array data: flipped bytes restore as wrong numbers.
So once a step is finalised, process 0 writes a SHA-256 of each of its files
into `STEP/tps_jax_sha256.json` (`checkpoints.runs.write_checksums`) from a
background thread that watches for the finalised step, so no host waits for
the hashing. A restore checks them first. A corrupt step (bad checksum,
unreadable metadata) is told apart from a mismatch (the step's arrays have
other names or shapes than this run's state: the config changed): a mismatch
stops the run, a corrupt latest step is moved aside to `checkpoints/corrupt-STEP`
with a loud warning and the newest intact step is restored instead (the input
stream is a function of the step, so the redone steps see the same batches).
Any other failure to read a step (memory, the filesystem, Orbax) is raised
unchanged and moves nothing.

With several processes, process 0 alone verifies a step and every process acts
on its verdict (broadcast), so a read that fails on one host cannot send that
host to set the step aside while the others train on. Paths go through
`etils.epath` (a `gs://` workdir works as with Orbax).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tps_jax import checkpoints as foreign
from tps_jax.checkpoints import runs as run_checkpoints

# The codes process 0 broadcasts after verifying a step: 0 intact, else what each raises.
_VERDICTS = {1: (foreign.CheckpointCorruptError, "corrupt"),
             2: (foreign.CheckpointMismatchError, "not matching this run"),
             3: (RuntimeError, "unreadable (not corrupt)")}


def _layout(tree) -> dict[str, tuple]:
  """"a/b/c" -> (shape, dtype) of each array of a state or of Orbax metadata (which stores a
  named tuple's fields as dict keys: both spell a field by its name)."""
  def name(k) -> str:  # DictKey.key, GetAttrKey.name, SequenceKey.idx
    return str(next((getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a)), k))
  return {"/".join(name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`, with per-step checksums."""

  def __init__(self, workdir: str | os.PathLike, *, every_steps: int = 1000, keep: int = 3,
               async_save: bool = True):
    self.directory = run_checkpoints.absolute(workdir) / "checkpoints"
    self.every_steps = every_steps
    self.async_save = async_save
    self._closed = False
    self._lock = threading.Lock()
    self._unsealed: list[int] = []  # saved by this run, checksums not yet written
    self._hashing = 0  # steps whose checksums a thread is writing now
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: dict, *, wait: bool = False) -> None:
    if step in self.manager.all_steps():
      return
    with self._lock:
      self._unsealed.append(step)
    self.manager.save(step, args=ocp.args.StandardSave(state))
    if wait or not self.async_save:
      self._seal()
    elif jax.process_index() == 0:  # seal in the background as soon as Orbax has finalised it
      threading.Thread(target=self._seal_when_final, args=(step,), daemon=True,
                       name=f"tps_jax-seal-{step}").start()

  def _seal_when_final(self, step: int) -> None:
    """Background thread (process 0): waits for `step`'s directory to be finalised (Orbax
    renames or commits it once every process has written its part), then writes its
    checksums. Leaves when the step is sealed or dropped by `_seal`."""
    delay = 0.02
    while True:
      with self._lock:
        if step not in self._unsealed:
          return
      if self._finalized(step):
        self._write_checksums([step])
        return
      time.sleep(delay)
      delay = min(2 * delay, 1.0)

  def _write_checksums(self, steps) -> None:
    """Claims each step (under the lock), then hashes it outside the lock, so a save that
    arrives meanwhile does not wait for the hashing. A failed write leaves the step without
    checksums (it still restores: Orbax's own commit stands) and is logged."""
    for step in steps:
      with self._lock:
        if step not in self._unsealed:
          continue  # sealed meanwhile by the other path
        self._unsealed.remove(step)
        self._hashing += 1
      try:
        if jax.process_index() == 0:
          run_checkpoints.write_checksums(self.directory / str(step))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint %s/%d: its checksums could not be written (%s: %s); it "
                        "restores without them.", self.directory, step, type(e).__name__, e)
      finally:
        with self._lock:
          self._hashing -= 1

  def _finalized(self, step: int) -> bool:
    step_dir = self.directory / str(step)
    return step_dir.is_dir() and ocp.step.is_checkpoint_finalized(step_dir)

  def _seal(self) -> None:
    """Waits for pending saves and any hashing in flight, seals what the saves finished and
    drops the rest (a step that is not there once every save is done was removed by
    max_to_keep)."""
    self.manager.wait_until_finished()
    with self._lock:
      pending = list(self._unsealed)
    self._write_checksums([s for s in pending if self._finalized(s)])
    with self._lock:
      self._unsealed = [s for s in self._unsealed if s not in pending]
    while True:  # a background thread may still be hashing a step it claimed
      with self._lock:
        if not self._hashing:
          return
      time.sleep(0.01)

  def verify(self, step: int, abstract_state: dict | None = None) -> None:
    """Raises CheckpointCorruptError if `step`'s bytes are damaged, CheckpointMismatchError
    if its arrays differ in name, shape or dtype from `abstract_state`'s."""
    step_dir = self.directory / str(step)
    run_checkpoints.check_checksums(step_dir)
    if abstract_state is None:
      return
    try:
      saved = _layout(self.manager.item_metadata(step).tree)
    except Exception as e:  # pylint: disable=broad-except
      raise foreign.CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: its metadata "
                                           f"cannot be read ({type(e).__name__}: {e}).") from e
    want = _layout(abstract_state)
    if saved != want:
      diff = [f"{k}: checkpoint {saved.get(k, 'absent')}, run {want.get(k, 'absent')}"
              for k in sorted(saved.keys() | want.keys()) if saved.get(k) != want.get(k)]
      raise foreign.CheckpointMismatchError(
          f"checkpoint {step_dir} does not match this run's model or optimizer (was the "
          f"config changed?): {len(diff)} array(s) differ, e.g. {diff[:3]}.")

  def restore(self, abstract_state: dict, step: int | None = None, *,
              warn: Callable[[str], None] | None = None) -> dict:
    """The state at `step`, laid out as `abstract_state`'s shardings.

    With no `step`: the newest intact step. Corrupt newer steps are moved to
    `checkpoints/corrupt-STEP` and reported through `warn` (and logging).
    An explicit `step` is restored or refused, never replaced.
    """
    steps = sorted(self.manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    skipped = []
    for s in steps:
      try:
        return self._restore(s, abstract_state)
      except foreign.CheckpointCorruptError as e:
        if step is not None:
          raise
        skipped.append(s)
        dest = self._set_aside(s)
        message = (f"WARNING: {e} Moved it to {dest.name} and going back to the previous "
                   f"step; the steps after that one will be trained again.")
        logging.warning(message)
        if warn:
          warn(message)
    raise foreign.CheckpointCorruptError(
        f"every checkpoint in {self.directory} is corrupt (steps {skipped}, now in "
        f"corrupt-STEP); delete them to start afresh.")

  def _restore(self, step: int, abstract_state: dict) -> dict:
    # Corruption is what the checksums or the metadata prove (verify). Anything else that
    # goes wrong while reading (out of memory, a slow or failing filesystem, an Orbax
    # upgrade) is not the checkpoint's fault: it is raised as it is and nothing is moved.
    self._shared_verify(step, abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def _shared_verify(self, step: int, abstract_state: dict) -> None:
    """`verify` on process 0, its verdict raised alike on every process."""
    if jax.process_count() == 1:
      self.verify(step, abstract_state)
      return
    error, code = None, 0
    if jax.process_index() == 0:
      try:
        self.verify(step, abstract_state)
      except (foreign.CheckpointCorruptError, foreign.CheckpointMismatchError) as e:
        error = e
        code = 1 if isinstance(e, foreign.CheckpointCorruptError) else 2
      except Exception as e:  # pylint: disable=broad-except (shared, then raised as it is)
        error, code = e, 3
    code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
    if error is not None:
      raise error
    if code:
      kind, what = _VERDICTS[code]
      raise kind(f"checkpoint {self.directory / str(step)}: process 0 found it {what}; its "
                 f"log says why.")

  def set_aside_steps(self) -> list[str]:
    """Names of the steps earlier restores moved aside as corrupt (`corrupt-STEP`)."""
    if not self.directory.is_dir():
      return []
    return sorted(p.name for p in self.directory.iterdir() if p.name.startswith("corrupt-"))

  def _set_aside(self, step: int) -> epath.Path:
    """Renames a corrupt step out of Orbax's sight (kept for inspection); returns where to."""
    dest, n = self.directory / f"corrupt-{step}", 1
    while dest.exists():  # the same step may go bad twice
      dest, n = self.directory / f"corrupt-{step}-{n}", n + 1
    multi = jax.process_count() > 1
    if multi:  # every process has chosen `dest` before it is created
      multihost_utils.sync_global_devices(f"tps_jax: choose where checkpoint {step} goes")
    if jax.process_index() == 0:
      (self.directory / str(step)).rename(dest)
    if multi:
      multihost_utils.sync_global_devices(f"tps_jax: checkpoint {step} set aside")
    self.manager.reload()
    return dest

  def close(self) -> None:
    """Finishes and seals pending saves, then closes the manager; a second call does nothing."""
    if self._closed:
      return
    self._closed = True
    try:
      self._seal()
    finally:
      self.manager.close()
