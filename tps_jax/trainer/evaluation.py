"""How good and how fast a model is: top-1 over a split, MACs, inference images/s.

  step = jax.jit(make_eval_step(model, preprocess))
  result = top1(step, params, source, split, preprocess, global_batch=..., data_sharding=...,
                speed_repeats=5)                   # {"top1", "examples", "images_per_s"}
  result |= cost(model)                              # {"gmacs", "method", ...}

The one evaluation path: the trainer's summary, the experiments and the
benchmarks all report these numbers through `top1`, `cost` and `speed` (the
bare forward's throughput, which the inference benchmark times:
`speed(forward(model), params, random_images(model, batch))`).
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
         data_sharding, bad_budget: float = data.BAD_BUDGET,
         speed_repeats: int = 0) -> dict[str, float]:
  """Top-1 over every example of `split` exactly once (padding, and undecodable images within
  `bad_budget`, masked out: `examples` says how many counted).

  speed_repeats > 0 also times `eval_step` on the split's first batch (kept on the devices,
  the program already compiled: no second compile; the first, not the last, which padding
  fills with blank images) and adds `images_per_s`, the evaluation program's throughput at
  `global_batch` (median of the repeats after one warm-up call; NaN for an empty split).
  """
  local = data.local_batch_size(global_batch, data_sharding)
  correct = total = 0
  first = None
  for batch in data.device_prefetch(
      data.eval_batches(source, split, preprocess, local_batch=local, bad_budget=bad_budget),
      data_sharding):
    first = batch if first is None and speed_repeats > 0 else first
    c, n = eval_step(params, batch)
    correct, total = correct + c, total + n
  correct, total = int(correct), int(total)
  result = {"top1": correct / max(total, 1), "examples": total}
  if speed_repeats > 0:  # every process has the same batches (padded): the same calls
    result["images_per_s"] = float("nan")
    if first is not None:
      t = timing.time_call(eval_step, params, first, repeats=speed_repeats, warmup=1)
      result["images_per_s"] = global_batch / t["median_s"]
  return result


def random_images(model: VisionTransformer, batch: int) -> jax.Array:
  """The timing input: (batch, H, W, C) standard-normal images. Random, not zeros: token
  reduction on constant images is a degenerate case (every score and similarity ties), and
  zeros can run faster than real data."""
  return jax.random.normal(
      jax.random.key(0), (batch, model.image_size, model.image_size, model.channels))


def forward(model: VisionTransformer):
  """The jitted inference forward, (params, images (B, H, W, C)) -> logits (B, classes)."""
  return jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])


def speed(fwd, params, images, *, repeats: int = 5, warmup: int = 1) -> dict[str, float]:
  """Inference images/s of `fwd(params, images)` (compile excluded), with the timing.

  fwd: `forward(model)` or its compiled form (a caller that also traces or dumps the program
  passes the one it compiled, so it compiles once); images: `random_images(model, batch)`.
  """
  t = timing.time_call(fwd, params, images, repeats=repeats, warmup=warmup)
  return {"images_per_s": images.shape[0] / t["median_s"], **t}


def cost(model: VisionTransformer) -> dict[str, Any]:
  """GMACs per image (analytic, `flops.macs`), the method and its plan's numbers
  (`Method.summary`: keep counts of staged methods, the largest per-block merge of merging
  ones)."""
  return {"gmacs": flops.macs(model) / 1e9, "keep_counts": [], "r": 0,
          **model.plan().summary()}
