"""Reporting shared by the benchmarks: the machine, a table, a JSON file (atomic).

Timing is `tps_jax.timing.time_call` (the trainer's images/s uses it too)."""

from __future__ import annotations

import os
import pathlib
import platform
from typing import Any

import jax

from tps_jax import atomic

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "processor": platform.processor() or platform.machine(),
          "jax": jax.__version__, "python": platform.python_version()}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
  cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
  print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
  print("  ".join("-" * w for w in widths))
  for row in cells:
    print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_json(name: str, payload: dict[str, Any], out: str | None = None) -> pathlib.Path:
  path = pathlib.Path(out) if out else RESULTS / f"{name}_{jax.devices()[0].platform}.json"
  atomic.write_json(path, {"machine": machine(), **payload})
  print(f"wrote {path}")
  return path
