"""How good and how fast a model is: top-1 over a split, MACs, inference images/s.

  result = evaluate(model, params, source, split, preprocess, global_batch=..., data_sharding=...)

The one evaluation path: the trainer's summary, the experiments and the
benchmarks all report these numbers through `top1` and `cost`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tps_jax import data, flops, timing
from tps_jax.models.vit import VisionTransformer


def make_eval_step(model: VisionTransformer, preprocess: data.Preprocess):
  """(params, batch) -> (correct, counted) over the batch's unmasked examples."""
  def eval_fn(params, batch):
    images = data.eval_images(batch["image"], preprocess)
    logits, _ = model.apply({"params": params}, images, train=False)
    correct = (jnp.argmax(logits, -1) == batch["label"]) & batch["mask"]
    return jnp.sum(correct), jnp.sum(batch["mask"])
  return eval_fn


def top1(eval_step, params, source, split, preprocess, *, global_batch: int,
         data_sharding, bad_budget: float = data.BAD_BUDGET) -> dict[str, float]:
  """Top-1 over every example of `split` exactly once (padding, and undecodable images within
  `bad_budget`, masked out: `examples` says how many counted)."""
  local = data.local_batch_size(global_batch, data_sharding)
  correct = total = 0
  for batch in data.device_prefetch(
      data.eval_batches(source, split, preprocess, local_batch=local, bad_budget=bad_budget),
      data_sharding):
    c, n = eval_step(params, batch)
    correct, total = correct + c, total + n
  correct, total = int(correct), int(total)
  return {"top1": correct / max(total, 1), "examples": total}


def speed(model: VisionTransformer, params, *, batch: int, data_sharding=None,
          repeats: int = 5, warmup: int = 1) -> dict[str, float]:
  """Inference images/s of the jitted model on one batch of random images (compile excluded),
  with the timing. Random, not zeros: token reduction on constant images is a degenerate case
  (every score and similarity ties), and zeros can run faster than real data."""
  images = jax.random.normal(
      jax.random.key(0), (batch, model.image_size, model.image_size, model.channels))
  if data_sharding is not None:
    images = jax.device_put(images, data_sharding)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])
  t = timing.time_call(fwd, params, images, repeats=repeats, warmup=warmup)
  return {"images_per_s": batch / t["median_s"], **t}


def cost(model: VisionTransformer, params, *, batch: int, data_sharding=None,
         repeats: int = 5) -> dict[str, Any]:
  """GMACs per image (analytic, `flops.macs`), inference images/s, and the method."""
  red = model.reduction
  return {"gmacs": flops.macs(model) / 1e9,
          "images_per_s": speed(model, params, batch=batch, data_sharding=data_sharding,
                                repeats=repeats)["images_per_s"],
          "method": red.method, "keep_counts": list(red.keep_counts),
          "tome_r": max(red.tome_r) if red.tome_r else 0}
