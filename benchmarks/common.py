"""Reporting shared by the benchmarks: the machine, a table, a JSON file (atomic).

Timing is `tps_jax.timing.time_call` (the trainer's images/s uses it too)."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
from typing import Any

import jax

from tps_jax import atomic

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def commit() -> str | None:
  """The code's commit: `TPS_JAX_COMMIT` (set it where the tree travels without .git, as on the
  lent GPU machine), else `git rev-parse`, else None."""
  if os.environ.get("TPS_JAX_COMMIT"):
    return os.environ["TPS_JAX_COMMIT"]
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True, cwd=RESULTS.parent.parent).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def machine() -> dict[str, Any]:
  """The device, the versions, the date (UTC) and the commit a result was measured on."""
  dev = jax.devices()[0]
  return {"platform": dev.platform, "device_kind": dev.device_kind,
          "device_count": jax.device_count(), "cpu_count": os.cpu_count(),
          "processor": platform.processor() or platform.machine(),
          "jax": jax.__version__, "python": platform.python_version(),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
          "commit": commit()}


def appendable(path: pathlib.Path) -> dict[str, Any]:
  """An earlier result file's payload to append to, or {} where there is none or it was
  measured on another device kind (rows of two cards are never mixed in one file)."""
  if not path.exists():
    return {}
  old = json.loads(path.read_text())
  here, there = jax.devices()[0].device_kind, old.get("machine", {}).get("device_kind")
  if there != here:
    print(f"  {path.name} holds rows from {there}, not {here}: starting afresh", flush=True)
    return {}
  return old


def subprocess_rows(args: list[str], env=None) -> list[dict[str, Any]]:
  """The `ROW {json}` lines a `python <args>` subprocess prints (run from the repository root);
  [] with its stderr's tail printed where it fails or prints none."""
  proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        cwd=RESULTS.parent.parent)
  rows = [json.loads(l[4:]) for l in proc.stdout.splitlines() if l.startswith("ROW ")]
  if proc.returncode or not rows:
    print(f"  failed: {' '.join(args)}\n{proc.stderr[-2000:]}", flush=True)
    return []
  return rows


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
