"""Files written whole or not at all: a temporary file in the same folder, then a rename.

Paths go through `etils.epath` (local paths, or `gs://` where its backend is installed).
"""

from __future__ import annotations

import json
import math
import numbers
import os
from typing import Any

from etils import epath
import numpy as np


def write_text(path: str | os.PathLike, text: str) -> epath.Path:
  """Writes `text` to `path` atomically (a reader sees the old file or the new one)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".{path.name}.tmp{os.getpid()}"
  try:
    tmp.write_text(text)
    tmp.replace(path)
  finally:
    if tmp.exists():
      tmp.unlink()
  return path


def _finite(value: Any) -> Any:
  """`value` with every NaN or infinity (Python, NumPy or JAX scalars) as None, tuples as lists."""
  if isinstance(value, dict):
    return {k: _finite(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite(v) for v in value]
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    value = float(value)
    return value if math.isfinite(value) else None
  return value


def to_json(payload: Any, *, indent: int | None = None) -> str:
  """`payload` as strict JSON: NaN and infinities, which JSON cannot hold, become null."""
  return json.dumps(_finite(payload), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> epath.Path:
  """`payload` as strict JSON (`to_json`) at `path`, atomically."""
  return write_text(path, to_json(payload, indent=indent) + "\n")
