"""The real train step compiled for a TPU pod topology on this CPU (libtpu's deviceless
compile, benchmarks/pod_compile.py): FSDP shards the state, reduce-scatters the gradients, and
the step's peak memory stays under a stated budget; a mesh over two slices lays its data axis
across them.

It runs in a subprocess (libtpu is loaded from .tpu/, which scripts/setup.sh installs, and only
there: loaded in every test process it would print its start-up complaints everywhere)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import ROOT

TPU_DIR = pathlib.Path(ROOT) / ".tpu"
# The tiny step (width 128, 2 blocks, 64 px, batch 64 over 4 chips), without the device
# augmentation: what FSDP changes, measured per chip.
SCRIPT = r"""
import json, sys
import numpy as np
from benchmarks import pod_compile as pc
from tps_jax.trainer import loop
devices = pc.topology_devices("v5e:2x2")
rows = {}
for name, mesh in (("data", {"data": 4, "fsdp": 1}), ("fsdp", {"data": 2, "fsdp": 2})):
  cfg = pc.build_config("tiny", "none", 64, mesh, teacher=False, augment=False, remat=False)
  compiled, seconds = pc.compile_step(cfg, devices, teacher=False)
  run = loop.Run(cfg, devices=devices)
  state = sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize
              for a in __import__("jax").tree.leaves(run.abstract_state))
  rows[name] = {**pc.row(compiled, seconds, "v5e:2x2"), "state_bytes": state}
# Two slices of it (8 chips): the data axis spans them, each fsdp group stays in one slice.
from tps_jax.trainer import sharding
two = pc.topology_devices("v5e:2x2", slices=2)
mesh = sharding.make_mesh([("data", -1), ("fsdp", 2)], devices=two, dcn=[("data", 2)])
grid = np.vectorize(lambda d: d.slice_index)(mesh.devices)
rows["slices"] = {"shape": dict(mesh.shape), "fsdp_in_one_slice": bool(
    (grid == grid[:, :1]).all()), "slices_on_data": sorted(set(grid[:, 0].tolist()))}
try:
  sharding.make_mesh([("data", -1), ("fsdp", 2)], devices=two)
except ValueError as e:
  rows["slices"]["without_dcn"] = str(e)
json.dump(rows, sys.stdout)
"""
PEAK_BUDGET_MIB = 48  # the fsdp step's peak per chip (measured about 29 MiB)


@pytest.mark.skipif(not (TPU_DIR / "libtpu").is_dir(),
                    reason="libtpu is not installed in .tpu/ (bash scripts/setup.sh installs it)")
def test_fsdp_train_step_for_a_tpu_topology_shards_reduce_scatters_and_fits():
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # the suite's CPU compile flags are not the TPU compiler's
  out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads(out.stdout.strip().splitlines()[-1])
  data, fsdp = rows["data"], rows["fsdp"]
  # The parameters and both Adam moments are split over fsdp: the state per chip halves, and
  # the compiled arguments (the state, the batch, TPU tile padding) shrink with it.
  assert fsdp["state_bytes"] < 0.55 * data["state_bytes"], (fsdp, data)
  assert fsdp["arguments_gib"] < 0.8 * data["arguments_gib"], (fsdp, data)
  # Data parallel all-reduces the gradients; FSDP gathers the parameters and reduce-scatters
  # the gradients' partial sums (not only all-reduces them at full size).
  assert set(data["collectives"]) == {"all-reduce"}, data["collectives"]
  assert fsdp["collectives"].get("reduce-scatter", {}).get("count", 0) >= 1, fsdp["collectives"]
  assert fsdp["collectives"].get("all-gather", {}).get("count", 0) >= 1, fsdp["collectives"]
  assert fsdp["peak_gib"] * 1024 < PEAK_BUDGET_MIB, fsdp
  assert fsdp["fits"] and fsdp["tflops_per_chip"] > 0
  # A multi-slice mesh: the hybrid layout puts the data axis across the slices.
  slices = rows["slices"]
  assert slices["shape"] == {"data": 4, "fsdp": 2} and slices["fsdp_in_one_slice"], slices
  assert slices["slices_on_data"] == [0, 1], slices
  assert "span 2 slices; say how each mesh axis splits" in slices["without_dcn"], slices


def test_the_docs_table_takes_each_configuration_once_newest_first(tmp_path):
  """`--table`: one row per configuration, a row with the activation constraints (`slices`
  recorded) in place of an older one, ordered by topology, slices, model and method."""
  base = dict(topology="v5e:16x16", batch=4096, mesh="data=16,fsdp=16", teacher=False,
              hbm_gib=16, tflops_per_chip=1.0,
              collectives={"all-gather": {"count": 2, "bytes": 2 ** 30}})
  old = [dict(base, model="B", method="none", peak_gib=1.6),
         dict(base, model="S", method="etps", peak_gib=0.7)]
  new = [dict(base, model="B", method="none", peak_gib=1.5, slices=1, dcn=""),
         dict(base, model="B", method="etps", peak_gib=1.2, slices=2, dcn="data=2", batch=8192)]
  paths = []
  for name, rows in (("old", old), ("new", new)):
    paths.append(tmp_path / f"{name}.json")
    paths[-1].write_text(json.dumps({"rows": rows}))
  out = subprocess.run([sys.executable, "-m", "benchmarks.pod_compile", "--table",
                        *map(str, paths)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert out.returncode == 0, out.stderr[-2000:]
  lines = [l for l in out.stdout.splitlines() if l.startswith("| v5e")]
  assert [l.split(" | ")[1:3] for l in lines] == [["S", "etps"], ["B", "none"], ["B", "etps"]]
  assert "| 1.50 / 16 |" in lines[1] and lines[1].endswith("| yes |")  # the newer B row
  assert lines[0].endswith("| no |") and "| 1.00 | 0.00 | 0.00 | no |" in lines[0]
  assert lines[2].startswith("| v5e:16x16 x 2 slices | B | etps | 8192 | data=16,fsdp=16, dcn data=2 |")
