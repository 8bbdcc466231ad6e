"""Our own run checkpoints on disk: per-step checksums, a run's steps, its newest intact params.

  params = runs.read_params(workdir)   # flat {"a/b/c": array}, newest intact step
  runs.save_params_npz(params, workdir / "params.npz")

A tps_jax workdir holds `checkpoints/STEP/default` (Orbax, written by
`trainer.state.Checkpoints`) and, in each step, `tps_jax_sha256.json`: the
SHA-256 of every file of the step, written once Orbax has finalised it. Orbax
does not checksum array data (flipped bytes restore as wrong numbers), so a
read checks them first. A step is *corrupt* when its checksums differ or its
metadata cannot be read, and only then: a read that fails for another reason
(memory, the filesystem, an Orbax upgrade) is raised as it is. Reading the
params of a workdir takes its newest intact step, as the trainer's restore does,
and says which steps it passed over.

Loading other projects' checkpoints (timm / DeiT / TPS state dicts, big_vision
.npz) is the rest of `tps_jax.checkpoints`; the trainer's Orbax manager is
`trainer.state`. Paths go through `etils.epath`, so a `gs://` workdir works as
it does for Orbax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

from etils import epath
import flax
import numpy as np

from tps_jax.checkpoints.assemble import to_flat
from tps_jax.checkpoints.errors import CheckpointCorruptError, CheckpointMismatchError

CHECKSUMS = "tps_jax_sha256.json"  # in each Orbax step directory the trainer writes
ITEM = "default"  # trainer.state.Checkpoints' item name inside a step


def _files(step_dir: epath.Path):
  for path in sorted(step_dir.iterdir()):
    if path.is_dir():
      yield from _files(path)
    elif not path.name.startswith(CHECKSUMS):
      yield path


def _digests(step_dir: epath.Path) -> dict[str, str]:
  """Relative path -> SHA-256 of every file of a step directory (the checksum file aside)."""
  out = {}
  for path in _files(step_dir):
    h = hashlib.sha256()
    with path.open("rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
    out[str(path.relative_to(step_dir))] = h.hexdigest()
  return out


def write_checksums(step_dir: str | os.PathLike) -> None:
  """Records the SHA-256 of each file of a finished step, atomically (temporary + rename)."""
  step_dir = epath.Path(step_dir)
  tmp = step_dir / f".{CHECKSUMS}.tmp{os.getpid()}"
  tmp.write_text(json.dumps(_digests(step_dir), indent=0) + "\n")
  tmp.replace(step_dir / CHECKSUMS)


def check_checksums(step_dir: str | os.PathLike) -> None:
  """Raises CheckpointCorruptError if a file of the step differs from its recorded SHA-256.

  A step without a checksum file (written before checksums, or cut off between
  Orbax's commit and the checksum) passes: Orbax's own atomic commit stands.
  """
  step_dir = epath.Path(step_dir)
  sums = step_dir / CHECKSUMS
  if not sums.exists():
    return
  try:
    expected = json.loads(sums.read_text())
  except ValueError as e:
    raise CheckpointCorruptError(f"checkpoint {step_dir}: {CHECKSUMS} is unreadable: "
                                 f"{e}") from None
  actual = _digests(step_dir)
  bad = sorted(k for k in expected.keys() | actual.keys() if expected.get(k) != actual.get(k))
  if bad:
    raise CheckpointCorruptError(
        f"checkpoint {step_dir} is corrupt: {len(bad)} file(s) differ from the checksums "
        f"written when it was saved, e.g. {bad[:3]}.")


def absolute(path: str | os.PathLike) -> epath.Path:
  """`path` as Orbax (tensorstore) needs it: local paths made absolute, URLs as they are."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def step_dirs(path: str | os.PathLike) -> tuple[list[epath.Path], bool]:
  """The step directories a path names, newest first, and whether it named one step.

  `path`: a workdir (its `checkpoints/`), a checkpoints directory, or one step directory.
  """
  path = absolute(path)
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = sorted((int(p.name) for p in root.iterdir() if p.name.isdigit()), reverse=True) \
      if root.is_dir() else []
  if steps:
    return [root / str(s) for s in steps], False
  if (path / ITEM).is_dir():
    return [path], True
  raise FileNotFoundError(f"no tps_jax checkpoint under {path} "
                          f"(expected WORKDIR/checkpoints/STEP/{ITEM}).")


def _read_step(step_dir: epath.Path) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top (a [train] dependency)
  check_checksums(step_dir)
  item = step_dir / ITEM
  checkpointer = ocp.StandardCheckpointer()
  try:
    checkpointer.metadata(item)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: its metadata cannot be "
                                 f"read ({type(e).__name__}: {str(e)[:300]}).") from None
  try:
    restored = checkpointer.restore(item)  # other failures are not the checkpoint's: raised
  except json.JSONDecodeError as e:  # its own metadata files do not parse
    raise CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: its metadata cannot be "
                                 f"read ({type(e).__name__}: {str(e)[:300]}).") from None
  if "params" not in restored:
    raise CheckpointMismatchError(f"{item} holds no 'params' entry.")
  flat = flax.traverse_util.flatten_dict(restored["params"], sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def read_params(path: str | os.PathLike, *,
                warn: Callable[[str], None] = logging.warning) -> dict[str, np.ndarray]:
  """Flat params of a run's newest intact step (or of the one step `path` names).

  Corrupt newer steps are passed over (nothing on disk is moved: a reader may be one of
  many) and reported through `warn`; a named step is read or refused.
  """
  dirs, named = step_dirs(path)
  skipped = []
  for step_dir in dirs:
    try:
      params = _read_step(step_dir)
    except CheckpointCorruptError as e:
      if named:
        raise
      skipped.append(step_dir.name)
      warn(f"WARNING: {e} Reading the step before it.")
      continue
    return params
  raise CheckpointCorruptError(f"every checkpoint under {path} is corrupt (steps {skipped}).")


def save_params_npz(params: Any, path: str | os.PathLike) -> epath.Path:
  """params -> a flat "a/b/c" `.npz` (big_vision layout names), written atomically."""
  path = epath.Path(path)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}.npz"
  with tmp.open("wb") as f:
    np.savez(f, **to_flat(params))
  tmp.replace(path)
  return path
