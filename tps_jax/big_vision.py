"""A drop-in for `big_vision.models.vit`: the same constructor, outputs, parameters and `load`,
with every tps_jax token reduction on top.

  from tps_jax import big_vision as tps_vit
  model = tps_vit.Model(num_classes=1000, variant="B/16", pool_type="map",
                        reduction=dict(method="etps", keep_ratio=0.7, locations=(3, 6, 9)))
  params = model.init(rng, images)["params"]
  params = tps_vit.load(params, "siglip_b16_224.npz:img", model_cfg)   # big_vision's load
  logits, out = model.apply({"params": params}, images, train=False)

In a big_vision config (big_vision imports `big_vision.models.<model_name>`):

  import tps_jax.big_vision; tps_jax.big_vision.register()     # once, e.g. in the config
  config.model_name = "tps_vit"
  config.model = dict(variant="B/16", pool_type="gap", reduction=dict(method="etps", ...))

Every field of big_vision's ViT keeps its meaning and default: `patch_size`, `width`,
`depth`, `mlp_dim`, `num_heads`, `posemb` ("learn" | "sincos2d"), `rep_size`, `dropout`,
`pool_type` ("gap" | "map" | "tok" | "0" | "none"), `head_zeroinit`, `scan`,
`remat_policy`, `dtype_mm`; variants "mu" ... "So400m", "H", "g", "G", "e". Ours on top:
`reduction`, `policy_form`, `attention`, `gelu` (default "tanh", flax's, as big_vision),
`image_size` (default None: any input size, as big_vision).

`out` holds big_vision's keys: `encoded`, `head_input` (pooled types), `pre_logits`,
`pre_logits_2d`, `logits`, `logits_2d`. After a reduction each grid cell of the 2-D outputs
takes the value of the token its patch ended in (zero where a method dropped it), and the
pooling weighs each token by the patches it stands for. The model itself is
`tps_jax.models.vit`: DeiT, timm and big_vision checkpoints run through the same blocks.
"""

from __future__ import annotations

import re
import sys
from typing import Any

import jax.numpy as jnp

from tps_jax.checkpoints.big_vision_npz import (fix_old_checkpoints, load, load_tree, merge_params,  # noqa: F401
                                            pyloop_to_scan, resample_posemb, scan_to_pyloop)
from tps_jax.models import vit

DEFAULTS = dict(patch_size=(16, 16), width=768, depth=12, mlp_dim=None, num_heads=12,
                posemb="learn", rep_size=False, dropout=0.0, pool_type="gap",
                head_zeroinit=True, scan=False, remat_policy="nothing_saveable",
                dtype_mm="float32")
OURS = ("reduction", "policy_form", "attention", "gelu", "image_size", "channels", "drop_path",
        "remat", "layer_norm_eps", "gumbel_noise")
FLAX = ("name", "parent")  # every flax Module takes them: big_vision builds towers with name=


def decode_variant(variant: str | None) -> dict[str, Any]:
  """big_vision's `decode_variant`: "B" or "B/32" -> sizes (and patch_size as a pair)."""
  out = vit.decode_variant(variant)
  if "patch_size" in out:
    out["patch_size"] = (out["patch_size"],) * 2
  return out


def Model(num_classes: int | None = None, *, variant: str | None = None,  # noqa: N802
          **kw) -> vit.VisionTransformer:
  """big_vision's `vit.Model(num_classes, *, variant, **kw)`, reducible (`reduction=`).

  Args:
    num_classes: the head's outputs; None or 0 for no head (an image tower).
    variant: "mu" ... "So400m", "H", "g", "G", "e", optionally with "/patch" ("B/16").
    **kw: big_vision's ViT fields (DEFAULTS), ours (OURS: `reduction` first), and flax's
      Module keywords `name` and `parent` (big_vision's two_towers, one_tower and paligemma
      build their towers as `Model(**cfg, name="img")`).
  Returns:
    A `tps_jax.models.vit.VisionTransformer` in big_vision's layout; `apply` returns
    `(logits, out)` with big_vision's `out` keys. Raises ValueError naming unknown fields.
  """
  unknown = sorted(set(kw) - set(DEFAULTS) - set(OURS) - set(FLAX))
  if unknown:
    raise ValueError(f"unknown ViT fields {unknown}; big_vision's are {sorted(DEFAULTS)}, "
                     f"tps_jax adds {sorted(OURS)}.")
  cfg = {**DEFAULTS, **decode_variant(variant), **kw}
  dtype = cfg.pop("dtype_mm")
  cfg.setdefault("gelu", "tanh")
  cfg.setdefault("image_size", None)
  return vit.Model(num_classes, layout="big_vision", dtype=jnp.dtype(dtype), outputs_2d=True,
                   **cfg)


def register(name: str = "tps_vit") -> None:
  """Makes `importlib.import_module("big_vision.models.<name>")` return this module.

  Args:
    name: the model name big_vision configs then use (`model_name = "tps_vit"`, or
      `image_model = "tps_vit"` in two_towers).
  Returns:
    None; raises ValueError for a name that is not an identifier.
  """
  if not re.fullmatch(r"\w+", name):
    raise ValueError(f"model name {name!r} must be a Python identifier.")
  module = sys.modules[__name__]
  sys.modules[f"big_vision.models.{name}"] = module
  parent = sys.modules.get("big_vision.models")
  if parent is not None:
    setattr(parent, name, module)
