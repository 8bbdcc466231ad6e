"""tps_jax.host: tcmalloc preloaded by re-executing the entry point."""

import os
import subprocess
import sys

import pytest

from tps_jax import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_tcmalloc = pytest.mark.skipif(host.tcmalloc_path() is None,
                                    reason="no tcmalloc here (scripts/setup.sh installs it)")


@needs_tcmalloc
def test_with_tcmalloc_adds_it_once_and_keeps_other_preloads():
  env = host.with_tcmalloc({"LD_PRELOAD": "/lib/other.so"})
  assert env["LD_PRELOAD"] == f"{host.tcmalloc_path()}:/lib/other.so"
  assert host.with_tcmalloc(env) == env  # already there: unchanged
  assert host.with_tcmalloc({})["LD_PRELOAD"] == host.tcmalloc_path()


def test_turned_off_by_the_environment_variable():
  assert "LD_PRELOAD" not in host.with_tcmalloc({"TPS_JAX_TCMALLOC": "0"})


@needs_tcmalloc
def test_reexec_runs_the_same_command_under_tcmalloc():
  script = ("import sys; from tps_jax import host; print('start', flush=True); "
            "host.reexec_with_tcmalloc(); "
            "maps = open('/proc/self/maps').read(); "
            "print('tcmalloc' in maps, sys.argv[1:])")
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TPS_JAX_TCMALLOC")}
  out = subprocess.run([sys.executable, "-c", script, "a", "b"], cwd=ROOT, env=env,
                       capture_output=True, text=True, check=True).stdout.split("\n")
  assert out[:3] == ["start", "start", "True ['a', 'b']"], out  # ran twice, then loaded
  off = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                       env={**env, "TPS_JAX_TCMALLOC": "0"}, capture_output=True, text=True,
                       check=True).stdout.split("\n")
  assert off[:2] == ["start", "False []"], off
