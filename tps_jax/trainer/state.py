"""The train state and its Orbax checkpoints.

  state = {"step": int32 (), "params": ..., "opt_state": ..., "rng": uint32 key data}

`Checkpoints(workdir)` saves asynchronously every N steps, keeps the last K,
and writes each step atomically (Orbax renames a finished temporary
directory), so a killed run restarts from its last complete step. Restoring
takes the target shardings, so a run resumes onto a different mesh.

Orbax does not checksum array data: flipped bytes restore as wrong numbers.
So once a step is written, a SHA-256 of each of its files goes into
`STEP/tps_jax_sha256.json` (`checkpoints.write_checksums`), and a restore checks them first. A corrupt step
(bad checksum, unreadable metadata or data) is told apart from a mismatch (the
step's arrays have other names or shapes than this run's state: the config
changed): a mismatch stops the run, a corrupt latest step is moved aside to
`checkpoints/corrupt-STEP` with a loud warning and the newest intact step is
restored instead (the input stream is a function of the step, so the redone
steps see the same batches). Any other failure to read a step (memory, the
filesystem, Orbax) is raised unchanged and moves nothing.
"""

from __future__ import annotations

import logging
import os
import pathlib
from typing import Callable

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tps_jax import checkpoints as foreign


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
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=ocp.StandardCheckpointHandler())
    self._unsealed: list[int] = []  # saved by this run, checksums not yet written

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: dict, *, wait: bool = False) -> None:
    if step in self.manager.all_steps():
      return
    self._seal()
    self.manager.save(step, args=ocp.args.StandardSave(state))
    self._unsealed.append(step)
    if wait:
      self._seal()

  def _seal(self) -> None:
    """Waits for pending saves, then writes the checksums of the steps they finished."""
    self.manager.wait_until_finished()
    if jax.process_index() == 0:  # Orbax finalises a step only once every process wrote it
      for step in self._unsealed:
        step_dir = self.directory / str(step)
        if step_dir.is_dir():  # max_to_keep may have removed it already
          foreign.write_checksums(step_dir)
    self._unsealed = []

  def verify(self, step: int, abstract_state: dict | None = None) -> None:
    """Raises CheckpointCorruptError if `step`'s bytes are damaged, CheckpointMismatchError
    if its arrays differ in name, shape or dtype from `abstract_state`'s."""
    step_dir = self.directory / str(step)
    foreign.check_checksums(step_dir)
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
    self.verify(step, abstract_state)
    return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def set_aside_steps(self) -> list[str]:
    """Names of the steps earlier restores moved aside as corrupt (`corrupt-STEP`)."""
    if not self.directory.is_dir():
      return []
    return sorted(p.name for p in self.directory.iterdir() if p.name.startswith("corrupt-"))

  def _set_aside(self, step: int) -> pathlib.Path:
    """Renames a corrupt step out of Orbax's sight (kept for inspection); returns where to."""
    dest, n = self.directory / f"corrupt-{step}", 1
    while dest.exists():  # the same step may go bad twice
      dest, n = self.directory / f"corrupt-{step}-{n}", n + 1
    multi = jax.process_count() > 1
    if multi:  # every process has chosen `dest` before it is created
      multihost_utils.sync_global_devices(f"tps_jax: choose where checkpoint {step} goes")
    if jax.process_index() == 0:
      os.replace(self.directory / str(step), dest)
    if multi:
      multihost_utils.sync_global_devices(f"tps_jax: checkpoint {step} set aside")
    self.manager.reload()
    return dest

  def close(self) -> None:
    self._seal()
    self.manager.close()
