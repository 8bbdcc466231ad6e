"""Shared test fixtures: the authors' golden outputs and small random inputs."""

import os
import pathlib

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The project's shared folder sits beside the checkout (../shared); TPS_SHARED overrides.
SHARED = pathlib.Path(os.environ.get("TPS_SHARED", ROOT.parent / "shared"))


def golden(name: str) -> dict:
  """Loads `shared/golden/<name>.npz`; a missing file fails loudly, never skips."""
  path = SHARED / "golden" / f"{name}.npz"
  if not path.exists():
    pytest.fail(f"golden file {path} is missing: set TPS_SHARED to the shared/ folder.")
  with np.load(path, allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


def tokens(seed: int, *shape, dtype=np.float32) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(dtype)
