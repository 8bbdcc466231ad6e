"""Reading checkpoint files into flat numpy state dicts: `.npz`, `.safetensors`, `.pth`."""

from __future__ import annotations

import os
import pathlib
import zipfile
from typing import Any, Mapping

import numpy as np

from tps_jax.checkpoints.errors import CheckpointCorruptError


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict from `.npz`, `.safetensors` or `.pth` / `.pt` into numpy arrays."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint file {path} does not exist.")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise CheckpointCorruptError(f"checkpoint file {path} is not a readable .npz of arrays "
                                   f"(corrupt or truncated?): {e}") from e
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(f"reading {path} needs the `safetensors` package "
                        "(pip install safetensors).") from e
    return dict(load_file(str(path)))
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to "
                        ".npz / .safetensors first.") from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in unwrap(obj).items()}
  raise ValueError(f"unknown checkpoint format {suffix!r} for {path}; expected .npz, "
                   ".safetensors or .pth.")


def unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """DeiT checkpoints nest the weights under "model" (or "state_dict")."""
  for key in ("model", "state_dict", "module"):
    if key in sd and isinstance(sd[key], Mapping):
      return sd[key]
  return sd
