"""Device time of a traced program, by kind of kernel and by kernel (from jax.profiler)."""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import shutil
import tempfile

import jax

KINDS = (  # (kind, pattern on the kernel or op name), first match wins
    ("attention", r"fmha|flash|cudnn.*attn|_attn_|attention"),
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|dot|sm\d+_.*mma"),
    ("convolution", r"conv(?!ert)|cudnn.*conv"),
    ("reduction", r"reduce|reduction|row_reduction|column_reduction"),
    ("sort/top-k", r"sort|topk|top_k|radix"),
    ("gather/scatter", r"gather|scatter|dynamic.slice|dynamic.update"),
    ("copy/transpose", r"copy|transpose|memcpy|memset"),
    ("elementwise fusion", r"fusion|loop_|input_|wrapped_"),
)


def kind_of(name: str) -> str:
  low = name.lower()
  for kind, pattern in KINDS:
    if re.search(pattern, low):
      return kind
  return "other"


def kernel_summary(trace_dir: str, steps: int) -> dict:
  """Per-step device time by kind and by op, from the newest perfetto trace under trace_dir."""
  paths = sorted(pathlib.Path(trace_dir).rglob("*.trace.json.gz")) or sorted(
      pathlib.Path(trace_dir).rglob("perfetto_trace.json.gz"))
  if not paths:
    return {"error": f"no trace file under {trace_dir}"}
  with gzip.open(paths[-1], "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {pid for pid, n in names.items() if re.search(r"/device:(GPU|TPU)", n)}
  by_kind, by_op = collections.Counter(), collections.Counter()
  total = 0.0
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in device_pids or "dur" not in e:
      continue
    args = e.get("args", {})
    op = args.get("hlo_op") or args.get("long_name") or e.get("name", "")
    kernel = e.get("name", "")
    us = float(e["dur"]) / steps
    k = kind_of(kernel) if kind_of(kernel) != "elementwise fusion" else kind_of(op)
    by_kind[k] += us
    by_op[f"{op} [{kernel[:60]}]"] += us
    total += us
  return {"device_ms_per_step": total / 1e3, "trace_file": str(paths[-1]),
          "process_names": sorted(set(names.values()))[:12],
          "by_kind_ms": {k: v / 1e3 for k, v in by_kind.most_common()},
          "top_ops_ms": {k: v / 1e3 for k, v in by_op.most_common(25)}}


def trace(fn, steps: int = 3, keep: str | pathlib.Path | None = None) -> dict:
  """Traces `steps` calls of fn() and summarises their kernels; `keep`: where to copy the trace."""
  trace_dir = tempfile.mkdtemp(prefix="trace_")
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  for _ in range(steps):
    jax.block_until_ready(fn())
  jax.profiler.stop_trace()
  summary = kernel_summary(trace_dir, steps)
  if keep and "trace_file" in summary:
    summary["trace_file"] = str(shutil.copy(summary["trace_file"], keep))
  shutil.rmtree(trace_dir, ignore_errors=True)
  return summary
