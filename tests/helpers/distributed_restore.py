"""One JAX process of two that restore a checkpoint one of them reads as corrupt.

  python -m tests.helpers.distributed_restore PORT NUM_PROCESSES PROCESS_ID WORKDIR FLAKY

Both processes save steps 1 and 2, then restore the newest. Process FLAKY's
checksum check fails on step 2 (a bad read on that host alone): the processes
must still agree on the step they restore. Prints a JSON report.
"""

import json
import os
import sys
from unittest import mock

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position


def main():
  port, count, index, workdir, flaky = sys.argv[1:6]
  jax.distributed.initialize(f"localhost:{port}", int(count), int(index))
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.checkpoints import runs as run_checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import state as state_lib  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.P())

  def state(step):
    host = {"step": np.int32(step), "w": np.full((8,), step, np.float32)}
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda i, v=v: v[i])
            for k, v in host.items()}

  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                          state(0))
  ckpt = state_lib.Checkpoints(workdir, keep=5)
  for step in (1, 2):
    ckpt.save(step, state(step))
  ckpt.close()

  real = run_checkpoints.check_checksums

  def flaky_read(step_dir):
    if str(step_dir).endswith("/2"):
      raise checkpoints.CheckpointCorruptError(f"checkpoint {step_dir} is corrupt: a bad read "
                                               f"on process {jax.process_index()} only.")
    return real(step_dir)

  ckpt = state_lib.Checkpoints(workdir, keep=5)
  with mock.patch.object(run_checkpoints, "check_checksums",
                         flaky_read if jax.process_index() == int(flaky) else real):
    restored = ckpt.restore(abstract)
  report = {"process": jax.process_index(), "step": int(restored["step"]),
            "w": float(np.asarray(restored["w"].addressable_shards[0].data)[0]),
            "aside": ckpt.set_aside_steps()}
  ckpt.close()
  print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
