"""Timing a jitted call: block until ready, compile and warm-up excluded, median of repeats."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def time_call(fn: Callable[..., Any], *args, repeats: int = 10,
              warmup: int = 2) -> dict[str, float]:
  """Seconds per call of `fn(*args)` after `warmup` calls: median, min and max of `repeats`."""
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}.")
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "repeats": repeats}
