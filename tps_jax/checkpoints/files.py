"""Reading checkpoint files into flat numpy state dicts: `.npz`, `.safetensors`, `.pth`."""

from __future__ import annotations

import os
import pathlib
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from tps_jax.checkpoints.errors import CheckpointCorruptError


def _corrupt(path, problem: str) -> CheckpointCorruptError:
  return CheckpointCorruptError(f"checkpoint file {path} {problem}")


def _check_bytes(path: pathlib.Path, fmt: str, magic: tuple[bytes, ...]) -> None:
  """An empty file, or one whose first bytes are not `fmt`'s, named as such."""
  size = path.stat().st_size
  if size == 0:
    raise _corrupt(path, "is empty (0 bytes).")
  with open(path, "rb") as f:
    head = f.read(8)
  if magic and not head.startswith(magic):
    raise _corrupt(path, f"is not {fmt}: it starts with {head!r}, not {magic[0]!r}.")


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The arrays of an `.npz`; a damaged or foreign file, or one holding Python objects (which
  are never unpickled), is a CheckpointCorruptError naming the file and what is wrong."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint file {path} does not exist.")
  _check_bytes(path, "an .npz (a zip of .npy arrays)", (b"PK\x03\x04", b"PK\x05\x06"))
  try:
    data = np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    raise _corrupt(path, f"is not a readable .npz: truncated or damaged ({type(e).__name__}).") \
        from None
  out = {}
  with data:
    for k in data.files:
      try:
        out[k] = data[k]
      except ValueError as e:
        if "pickle" in str(e):
          raise _corrupt(path, f"holds {k!r} as pickled Python objects, not an array of "
                               "numbers: not a checkpoint of arrays (it is not unpickled).") from None
        raise _corrupt(path, f"has an unreadable array {k!r} ({e}).") from None
      except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise _corrupt(path, f"is truncated or damaged: array {k!r} cannot be read "
                             f"({type(e).__name__}).") from None
  if not out:
    raise _corrupt(path, "holds no arrays.")
  return out


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs the `safetensors` package "
                      "(pip install safetensors).") from None
  _check_bytes(path, ".safetensors", ())
  if path.stat().st_size < 8:
    raise _corrupt(path, f"is truncated: {path.stat().st_size} bytes, shorter than a "
                         ".safetensors header.")
  try:
    return dict(load_file(str(path)))
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise _corrupt(path, f"is not a readable .safetensors: truncated, damaged or another "
                         f"format ({type(e).__name__}: {str(e)[:120]}).") from None


def read_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  # torch.save writes a zip (or, before 1.6, a pickle stream starting with protocol 2's \x80).
  _check_bytes(path, "a PyTorch file", (b"PK\x03\x04", b"\x80"))
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to "
                      ".npz / .safetensors first.") from None
  try:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    text = str(e)
    if "weights_only" in text or "Unpickl" in type(e).__name__ or "GLOBAL" in text:
      raise _corrupt(path, "holds Python objects besides tensors, which a weights-only load "
                           "refuses: not a state dict (it is not unpickled).") from None
    raise _corrupt(path, f"is not a readable PyTorch file: truncated or damaged "
                         f"({type(e).__name__}).") from None
  obj = unwrap(obj) if isinstance(obj, Mapping) else obj
  if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
    raise _corrupt(path, f"holds a {type(obj).__name__}, not a state dict of tensors.")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items()}


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict from `.npz`, `.safetensors` or `.pth` / `.pt` into numpy arrays. A
  damaged or foreign file is one CheckpointCorruptError that names it and what is wrong."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint file {path} does not exist.")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    return read_npz(path)
  if suffix == ".safetensors":
    return read_safetensors(path)
  if suffix in (".pth", ".pt", ".bin"):
    return read_torch(path)
  raise ValueError(f"unknown checkpoint format {suffix!r} for {path}; expected .npz, "
                   ".safetensors or .pth.")


def unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """DeiT checkpoints nest the weights under "model" (or "state_dict")."""
  for key in ("model", "state_dict", "module"):
    if key in sd and isinstance(sd[key], Mapping):
      return sd[key]
  return sd
