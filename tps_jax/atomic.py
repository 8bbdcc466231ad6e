"""Files written whole or not at all: a temporary file in the same folder, then a rename.

Paths go through `etils.epath` (local paths, or `gs://` where its backend is installed).
"""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


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


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> epath.Path:
  """`payload` as JSON at `path`, atomically."""
  return write_text(path, json.dumps(payload, indent=indent) + "\n")
