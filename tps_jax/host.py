"""The host process's memory allocator: tcmalloc when the machine has it.

XLA on the CPU allocates and frees its buffers every step; under glibc's malloc
each large buffer goes back to the kernel and faults in again, page by page.
Measured on this project's 2-core machine (benchmarks/train_step.py's
Fashion-MNIST DynamicViT step with teacher, batch 128, `row(...)` timed in one
process per allocator, one run each, docs/speed.md):
78.6 img/s and 2.45M page faults under glibc, 110.2 img/s and 0.55M under
tcmalloc (jemalloc's defaults: 74.5, 2.84M). Debian's libtcmalloc-minimal4
(scripts/setup.sh installs it) is preloaded by re-executing the process, since
an allocator cannot be swapped once Python has started. TPS_JAX_TCMALLOC=0
turns this off.
"""

from __future__ import annotations

import glob
import os
import sys

_PATTERNS = ("/usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/*-linux-gnu/libtcmalloc.so.4",
             "/usr/lib64/libtcmalloc_minimal.so.4", "/usr/lib/libtcmalloc_minimal.so.4")
_MARK = "TPS_JAX_TCMALLOC"


def tcmalloc_path() -> str | None:
  """The first tcmalloc shared library found on this machine, or None."""
  for pattern in _PATTERNS:
    found = sorted(glob.glob(pattern))
    if found:
      return found[0]
  return None


def preloaded(env=None) -> bool:
  """Whether `env` (default: this process's) already preloads tcmalloc."""
  return "tcmalloc" in (os.environ if env is None else env).get("LD_PRELOAD", "")


def with_tcmalloc(env=None) -> dict[str, str]:
  """A copy of `env` (default: os.environ) that preloads tcmalloc, where there is one and
  TPS_JAX_TCMALLOC is not "0"; unchanged otherwise."""
  env = dict(os.environ if env is None else env)
  path = tcmalloc_path()
  if path and env.get(_MARK, "1") != "0" and not preloaded(env) and sys.platform == "linux":
    env["LD_PRELOAD"] = ":".join(p for p in (path, env.get("LD_PRELOAD", "")) if p)
  return env


def reexec_with_tcmalloc() -> None:
  """Replaces this process with itself under tcmalloc (same pid, arguments and environment
  plus LD_PRELOAD); returns only where there is nothing to do. Call it first thing in a
  program's entry point, before JAX starts."""
  env = with_tcmalloc()
  if preloaded(env) and not preloaded():
    env[_MARK] = "0"  # never twice, whatever happens to LD_PRELOAD after
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
