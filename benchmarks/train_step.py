"""Training images/s and memory of one jitted train step: dense vs dtps vs etps.

  python -m benchmarks.train_step [--quick]

Cases: DeiT-S/16 at 224 (batch 32 on CPU, 256 on GPU) and the Fashion-MNIST
ViT of configs/fashion_mnist.py (batch 128). The step is the trainer's own
(`loop.make_train_step`: device augmentation of uint8 batches (DeiT: RandAugment
m9 + erasing), mixing, forward, SPEC-4 losses, AdamW update);
fine-tuning methods are timed with and without the frozen dense teacher.
Memory is XLA's compiled estimate (arguments + outputs + temporaries); on a GPU
the device's peak bytes in use are added.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position

from benchmarks import common
from tps_jax import timing  # pylint: disable=wrong-import-position
from configs import common as common_cfg, fashion_mnist  # pylint: disable=wrong-import-position
from tps_jax import data  # pylint: disable=wrong-import-position
from tps_jax.models.vit import build_model  # pylint: disable=wrong-import-position
from tps_jax.trainer import loop, optim  # pylint: disable=wrong-import-position

LOSS = {"keep_weight": 2.0, "distill_weight": 0.5, "token_distill": True}


def _case(name, model_cfg, *, method, batch, channels, teacher, repeats, mixed_precision):
  locations = model_cfg.pop("locations")
  cfg = {**model_cfg, "reduction": common_cfg.reduction(method, 0.7, locations)}
  model = build_model(cfg, 10 if channels == 1 else 1000, mixed_precision=mixed_precision)
  size = model.image_size
  rng = jax.random.key(0)
  params = jax.jit(model.init)(rng, jnp.zeros((1, size, size, channels)))["params"]
  tx, _ = optim.make_optimizer(params, total_steps=1000, lr=1e-4, warmup_steps=10,
                               backbone_lr_scale=0.01 if method == "dtps" else 1.0)
  state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
           "rng": jax.random.key_data(rng)}
  t_model = t_params = None
  if teacher:
    t_model = build_model({**cfg, "reduction": None}, model.num_classes,
                               mixed_precision=mixed_precision)
    t_params = jax.jit(t_model.init)(rng, jnp.zeros((1, size, size, channels)))["params"]
  step = jax.jit(loop.make_train_step(model, tx, num_classes=model.num_classes,
                                      mixing=data.Mixing(), loss_cfg=LOSS, teacher=t_model,
                                      preprocess=data.Preprocess(size=size, channels=channels)),
                 donate_argnums=0)
  batch_data = {"image": jax.random.randint(rng, (batch, size, size, channels), 0, 256,
                                            jnp.int32).astype(jnp.uint8),
                "label": jnp.zeros((batch,), jnp.int32)}
  compiled = step.lower(state, batch_data, t_params).compile()
  mem = compiled.memory_analysis()
  mem_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
               if mem is not None else float("nan"))
  holder = {"state": state}

  def one():
    holder["state"], m = step(holder["state"], batch_data, t_params)
    return m["loss"]

  t = timing.time_call(one, repeats=repeats, warmup=1)
  row = {"case": name, "method": method + (" + teacher" if teacher else ""), "batch": batch,
         "images_per_s": batch / t["median_s"], "step_s": t["median_s"],
         "xla_mem_mb": mem_bytes / 2**20}
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    row["peak_mem_mb"] = stats["peak_bytes_in_use"] / 2**20
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="Fashion-MNIST ViT only")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  gpu = jax.default_backend() != "cpu"
  fm = fashion_mnist.get_config()
  fm_model = {**fm.model.to_dict(), "locations": (2, 4, 6)}
  cases = [("fmnist ViT 28px", fm_model, 128, 1, 10 if not gpu else 30)]
  if not args.quick:
    cases.append(("DeiT-S/16 224px", {"variant": "S/16", "image_size": 224,
                                      "locations": (3, 6, 9)}, 256 if gpu else 32, 3,
                  3 if not gpu else 20))
  rows = []
  for name, model_cfg, batch, channels, repeats in cases:
    for method, teacher in (("none", False), ("dtps", False), ("dtps", True),
                            ("etps", False), ("etps", True)):
      row = _case(name, dict(model_cfg), method=method, batch=batch, channels=channels,
                  teacher=teacher, repeats=repeats, mixed_precision=gpu)
      print(row, flush=True)
      rows.append(row)
  common.print_table(rows, ["case", "method", "batch", "images_per_s", "step_s", "xla_mem_mb"])
  common.write_json("train_step", {"rows": rows, "mixed_precision": gpu}, args.out)


if __name__ == "__main__":
  main()
