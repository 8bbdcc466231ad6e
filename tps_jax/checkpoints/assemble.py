"""A flat checkpoint ("a/b/c" -> array) checked against a model and made its params tree."""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tps_jax.checkpoints.errors import CheckpointMismatchError
from tps_jax.checkpoints.patch_kernel import resample_patch_kernel
from tps_jax.models import posemb
from tps_jax.models.vit import VisionTransformer

FRESH_GROUPS = ("head", "score_heads")


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def adapt_layout(flat: dict[str, np.ndarray], model: VisionTransformer, source: str, *,
                 resample: str | None = None) -> None:
  """The position table in the model's layout and on its grid, and the patch kernel at the
  model's patch size, in place.

  Layouts: DeiT's (the tokens before the patches, cls and registers, have positions) and
  big_vision's (patches only; timm's `no_embed_class`). A lead's positions fold into cls and
  the registers (exact: they are the same for every image); a table without them gains zero
  rows. `resample` ("linear", big_vision's; "bicubic", timm's; posemb.RESAMPLINGS) moves a
  table on another square grid to the model's, and a patch kernel of another size to the
  model's (FlexiViT's pseudo-inverse resize, checkpoints.patch_kernel); None: either is a
  named error (the kernel's by `assemble`).
  """
  kernel = flat.get("embedding/kernel")
  patch = tuple(np.broadcast_to(model.patch_size, (2,)))
  if resample and kernel is not None and np.ndim(kernel) == 4 and kernel.shape[:2] != patch:
    # big_vision's (linear) or timm's (bicubic, antialiased), whose transformers has none
    flat["embedding/kernel"] = resample_patch_kernel(
        kernel, patch, method="linear" if resample == "linear" else "bicubic")
  if "pos_embedding" not in flat:
    return
  pos = flat["pos_embedding"]
  n0 = model.num_patches
  lead = int(model.has_cls) + model.num_registers  # tokens before the patches
  rows = pos.shape[1]
  if rows in (n0, n0 + lead):
    had = rows - n0
  elif resample and lead and _is_square(rows - lead):
    had = lead
  elif resample and _is_square(rows):
    had = 0
  else:
    before = f" and {lead} tokens before them" if lead else ""
    raise CheckpointMismatchError(
        f"pos_embedding in the {source} has {rows} positions; this model has {n0} patches "
        f"({model.image_size}px / {model.patch_size}){before}; resize the position embedding "
        f"or build the model at the checkpoint's image size.")
  if rows - had != n0:
    pos = np.concatenate([pos[:, :had], posemb.resample(pos[:, had:], model.grid,
                                                         method=resample)], axis=1)
  if had and model.layout == "big_vision":
    if "cls" in flat and model.has_cls:
      flat["cls"] = flat["cls"] + pos[:, :1]
    if "registers" in flat and model.num_registers:
      flat["registers"] = flat["registers"] + pos[:, int(model.has_cls):had]
    pos = pos[:, had:]
  elif not had and lead and model.layout == "deit":
    pos = np.concatenate([np.zeros_like(pos[:, :1]).repeat(lead, axis=1), pos], axis=1)
  flat["pos_embedding"] = pos


def _dummy_image(model: VisionTransformer) -> jax.Array:
  return jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)


def _expected(model: VisionTransformer) -> dict[str, jax.ShapeDtypeStruct]:
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), _dummy_image(model))["params"])
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(shapes), sep="/")


def _group(key: str) -> str | None:
  if key.startswith("head/"):
    return "head"
  if re.match(r"Transformer/score_head_\d+/", key):
    return "score_heads"
  return None


def assemble(flat: Mapping[str, np.ndarray], model: VisionTransformer, *,
             fresh: Iterable[str] = (), rng: jax.Array | None = None,
             source: str = "checkpoint") -> dict:
  """Checks `flat` ("a/b/c" -> array) against the model and returns a params tree.

  Parts named in `fresh` ("head", "score_heads") are taken from a fresh
  initialisation (seeded by `rng`) and may be absent or differently shaped in
  `flat`. Everything else must match exactly.
  """
  fresh = set(fresh)
  bad = fresh - set(FRESH_GROUPS)
  if bad:
    raise ValueError(f"unknown fresh groups {sorted(bad)}; expected some of {FRESH_GROUPS}.")
  expected = _expected(model)
  missing = sorted(k for k in expected if k not in flat and _group(k) not in fresh)
  unexpected = sorted(k for k in flat if k not in expected and _group(k) not in fresh)
  mismatched = sorted(
      f"{k}: checkpoint {tuple(np.shape(flat[k]))} vs model {tuple(expected[k].shape)}"
      for k in flat if k in expected and _group(k) not in fresh
      and tuple(np.shape(flat[k])) != tuple(expected[k].shape))
  if missing or unexpected or mismatched:
    parts = []
    if missing:
      parts.append(f"missing from the {source}: {missing}")
    if unexpected:
      parts.append(f"not in the model: {unexpected}")
    if mismatched:
      parts.append(f"shape mismatches: {mismatched}")
    hint = ("" if fresh or not any(_group(k) for k in missing) else
            " (pass fresh=('head',) / ('score_heads',) to initialise those parts anew)")
    raise CheckpointMismatchError("; ".join(parts) + hint)

  params = {k: jnp.asarray(flat[k], expected[k].dtype) for k in expected if _group(k) not in fresh}
  if fresh:
    rng = rng if rng is not None else jax.random.key(0)
    init = flax.traverse_util.flatten_dict(
        flax.core.unfreeze(jax.jit(model.init)(rng, _dummy_image(model))["params"]), sep="/")
    params.update({k: v for k, v in init.items() if _group(k) in fresh})
  return flax.traverse_util.unflatten_dict(params, sep="/")


def to_flat(params) -> dict[str, np.ndarray]:
  """params tree -> {"a/b/c": numpy array}, e.g. to save as a big_vision-style .npz."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}
