"""Parameters from any checkpoint: timm / DeiT / OpenCLIP / Hugging Face / the authors' TPS,
big_vision .npz, our runs.

  params = checkpoints.load_params(path, model)  # any kind below, told apart by its form
  params = checkpoints.from_torch_state_dict(state_dict_or_path, model)   # timm.py (hf.py)
  params = checkpoints.from_big_vision(path, model)                        # big_vision.py
  params = checkpoints.runs.read_params(workdir)                           # runs.py (ours)
  model, params = checkpoints.from_pretrained(hub_dir, reduction="tome")   # pretrained.py

Each returns a params tree for `model.apply({"params": params}, ...)`, checks every shape
against the model (`assemble`), and reports missing, unexpected and mismatched keys by name
(`errors`). `fresh=("head",)` or `fresh=("score_heads",)` leaves those parts freshly
initialised (e.g. a dense DeiT checkpoint into a dTPS model).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable

import jax

from tps_jax.checkpoints import runs
from tps_jax.checkpoints.assemble import FRESH_GROUPS, adapt_layout, assemble, to_flat
from tps_jax.checkpoints.big_vision_npz import from_big_vision
from tps_jax.checkpoints.errors import CheckpointCorruptError, CheckpointMismatchError
from tps_jax.checkpoints.files import load_state_dict
from tps_jax.checkpoints.pretrained import from_pretrained, hub_state_dict, is_hub_directory
from tps_jax.checkpoints.timm import from_torch_state_dict
from tps_jax.models.vit import VisionTransformer

__all__ = ("CheckpointCorruptError", "CheckpointMismatchError", "FRESH_GROUPS", "adapt_layout",
           "assemble", "from_big_vision", "from_pretrained", "from_torch_state_dict",
           "is_hub_directory", "load_params", "load_state_dict", "runs", "to_flat")


def load_params(path: str | os.PathLike, model: VisionTransformer, *,
                fresh: Iterable[str] = (), rng: jax.Array | None = None) -> Any:
  """Parameters for `model` from a checkpoint of any kind this library reads.

  Args:
    path: a directory (a tps_jax workdir: its newest intact step; or one Orbax step of it; or
      a downloaded Hub directory, as `from_pretrained` reads);
      an `.npz` with "a/b/c" keys (ours, `params.npz`, or big_vision / AugReg); or an
      `.npz` / `.safetensors` / `.pth` with "a.b.c" keys (a timm / DeiT / OpenCLIP / Hugging
      Face transformers / TPS state dict).
    model: the VisionTransformer to load into.
    fresh: parts to initialise anew instead ("head", "score_heads").
    rng: the seed of the fresh parts.
  Returns:
    The params tree for `model.apply({"params": params}, ...)`. Raises FileNotFoundError,
    CheckpointCorruptError (unreadable bytes) or CheckpointMismatchError (naming the keys).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  if is_hub_directory(path):  # a downloaded Hub directory into a model built elsewhere
    return from_torch_state_dict(hub_state_dict(path), model, fresh=fresh, rng=rng)
  if path.is_dir():  # assemble ignores (and re-initialises) the `fresh` groups itself
    return assemble(runs.read_params(path), model, fresh=fresh, rng=rng,
                    source=f"checkpoint {path}")
  flat = load_state_dict(path)
  if any("/" in k for k in flat):
    return from_big_vision(flat, model, fresh=fresh, rng=rng)
  return from_torch_state_dict(flat, model, fresh=fresh, rng=rng)
