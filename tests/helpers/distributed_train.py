"""One JAX process of a multi-process run: trains a tiny config, prints a JSON report.

  python -m tests.helpers.distributed_train PORT NUM_PROCESSES PROCESS_ID WORKDIR [STEPS]
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=wrong-import-position


def main():
  port, count, index, workdir = sys.argv[1:5]
  steps = int(sys.argv[5]) if len(sys.argv) > 5 else 3
  jax.distributed.initialize(f"localhost:{port}", int(count), int(index))
  from configs import fashion_mnist  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  config = fashion_mnist.get_config(f"tiny,steps={steps},batch=32")
  config.tensorboard = False
  config.log_every_steps = 5
  summary = loop.train_and_evaluate(config, workdir)
  if summary.get("preempted"):
    print("REPORT " + json.dumps({"process": jax.process_index(), "preempted": True,
                                  "step": summary["step"]}), flush=True)
    return
  report = {"process": jax.process_index(), "processes": jax.process_count(),
            "devices": jax.device_count(), "top1": summary["top1"],
            "examples": summary["examples"], "step": summary["step"]}
  print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
