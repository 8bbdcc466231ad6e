"""The train state, its Orbax checkpoints, and loading parameters from any checkpoint kind.

  state = {"step": int32 (), "params": ..., "opt_state": ..., "rng": uint32 key data}

`Checkpoints(workdir)` saves asynchronously every N steps, keeps the last K,
and writes each step atomically (Orbax renames a finished temporary
directory), so a killed run restarts from its last complete step. Restoring
takes the target shardings, so a run resumes onto a different mesh.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from tps_jax import checkpoints as foreign
from tps_jax.models.vit import VisionTransformer


class Checkpoints:
  """Orbax CheckpointManager over `workdir/checkpoints`."""

  def __init__(self, workdir: str | os.PathLike, *, every_steps: int = 1000, keep: int = 3,
               async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=1, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    return self.every_steps > 0 and step % self.every_steps == 0

  def save(self, step: int, state: dict, *, wait: bool = False) -> None:
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.StandardSave(state))
    if wait:
      self.manager.wait_until_finished()

  def restore(self, abstract_state: dict, step: int | None = None) -> dict:
    """The state at `step` (default: latest), laid out as `abstract_state`'s shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}.")
    try:
      return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except (ValueError, KeyError, TypeError) as e:
      raise foreign.CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match this run's model or optimizer "
          f"(was the config changed?): {e}") from e

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _orbax_params(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Flat params of the latest step under a workdir, a checkpoints dir, or a step dir."""
  root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
  steps = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
  item = (root / str(max(steps)) if steps else path) / "default"  # Checkpoints' item name
  if not item.is_dir():
    raise FileNotFoundError(f"no tps_jax checkpoint under {path} "
                            f"(expected WORKDIR/checkpoints/STEP).")
  restored = ocp.StandardCheckpointer().restore(item.absolute())
  if "params" not in restored:
    raise foreign.CheckpointMismatchError(f"{item} holds no 'params' entry.")
  flat = flax.traverse_util.flatten_dict(restored["params"], sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def load_params(path: str | os.PathLike, model: VisionTransformer, *,
                fresh: Iterable[str] = (), rng: jax.Array | None = None) -> Any:
  """Parameters for `model` from a checkpoint of any kind this library reads.

  - a directory: a tps_jax workdir (its latest checkpoint) or an Orbax step;
  - `.npz` with "a/b/c" keys: ours (`params.npz`) or big_vision / AugReg;
  - `.npz` / `.safetensors` / `.pth` with "a.b.c" keys: a timm / DeiT / TPS state dict.
  Mismatches raise `CheckpointMismatchError` naming the keys.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  if path.is_dir():  # assemble ignores (and re-initialises) the `fresh` groups itself
    return foreign.assemble(_orbax_params(path), model, fresh=fresh, rng=rng,
                            source=f"checkpoint {path}")
  flat = foreign.load_state_dict(path)
  if any("/" in k for k in flat):
    return foreign.from_big_vision_npz(flat, model, fresh=fresh, rng=rng)
  return foreign.from_torch_state_dict(flat, model, fresh=fresh, rng=rng)


def save_params_npz(params, path: str | os.PathLike) -> pathlib.Path:
  """params -> a flat "a/b/c" `.npz` (big_vision layout names), written atomically."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **foreign.to_flat(params))
  os.replace(tmp, path)
  return path
