"""Trains (or resumes) a ViT with token reduction; or evaluates a checkpoint.

  python train.py --config configs/fashion_mnist.py --workdir runs/teacher
  python train.py --config configs/fashion_mnist.py:method=dtps,init=runs/teacher \
      --workdir runs/dtps --config.optim.lr=1e-4
  python train.py --config configs/fashion_mnist.py:method=dtps --evaluate runs/dtps

Multi-host: pass --coordinator HOST:PORT --num_processes N --process_id I (or
set JAX_COORDINATOR_ADDRESS etc.; on TPU pods and SLURM --distributed alone
lets JAX find them).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file[:arg].",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the summary go here.")
flags.DEFINE_string("evaluate", None, "Only evaluate this checkpoint (workdir, .npz, state dict).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize().")
flags.DEFINE_string("coordinator", None, "Coordinator address HOST:PORT (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of JAX processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's id (multi-host).")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  import jax  # pylint: disable=g-import-not-at-top
  if FLAGS.coordinator or FLAGS.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from tps_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  if FLAGS.evaluate:
    from tps_jax import atomic  # pylint: disable=g-import-not-at-top
    print(atomic.to_json(loop.evaluate(FLAGS.config, FLAGS.evaluate), indent=2))
    return
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required for training.")
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(),
               jax.device_count())
  loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  from tps_jax import cli, host  # pylint: disable=g-import-not-at-top
  host.reexec_with_tcmalloc()  # XLA allocates per-step buffers on the CPU (tps_jax/host.py)
  cli.run_absl(main)
