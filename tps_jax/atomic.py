"""Files written whole or not at all: a temporary file in the same folder, then a rename."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
  """Writes `text` to `path` atomically (a reader sees the old file or the new one)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
  try:
    tmp.write_text(text)
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)
  return path


def write_json(path: str | os.PathLike, payload: Any, *, indent: int | None = 2) -> pathlib.Path:
  """`payload` as JSON at `path`, atomically."""
  return write_text(path, json.dumps(payload, indent=indent) + "\n")
