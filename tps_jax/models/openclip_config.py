"""The `Model` settings of an OpenCLIP image tower, from its `open_clip_config.json`.

  kw = openclip_config.model_kwargs(json.load(open("open_clip_config.json")))

OpenCLIP builds its tower in one of two ways: its own ViT, whose sizes `vision_cfg` gives
(OpenAI's and LAION's CLIP: pre-norm, cls pooled, LayerNorm eps 1e-5, quick GELU where
`quick_gelu`), or a timm model (`timm_model_name`, e.g. SigLIP's), read by `timm_names`.
Options beyond a plain ViT (layer scale, attentional pooling, a timm tower's own projection
or average pooling) are named errors.
"""

from __future__ import annotations

from typing import Any, Mapping

from tps_jax.models import timm_names

# OpenCLIP's own tower: the vision_cfg keys read
KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}


def model_kwargs(config: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
  """`Model`'s keyword arguments for an OpenCLIP config (the file's dict, or its
  `model_cfg`); `overrides` replace them. Raises ValueError naming what it does not read."""
  model_cfg = config.get("model_cfg", config)
  v = dict(model_cfg.get("vision_cfg") or {})
  if v.get("timm_model_name"):  # OpenCLIP's defaults: a linear projection, average pooling
    proj, pool = v.get("timm_proj", "linear"), v.get("timm_pool", "avg")
    if proj not in ("none", None, "") or pool in ("avg", "abs_attn", "rot_attn"):
      raise ValueError(f"OpenCLIP's timm tower {v['timm_model_name']!r} with timm_proj "
                       f"{proj!r} and timm_pool {pool!r} is not read; towers with the timm "
                       "model's own pooling and no projection (timm_proj 'none') are.")
    kw = timm_names.model_kwargs(v["timm_model_name"], image_size=v.get("image_size", 224))
  else:
    other = sorted(set(v) - KEYS)
    if other:
      raise ValueError(f"OpenCLIP vision_cfg keys {other} are not read; a plain ViT tower "
                       f"takes {sorted(KEYS)}.")
    width = v.get("width", 768)
    kw = dict(width=width, depth=v.get("layers", 12), num_heads=width // v.get("head_width", 64),
              mlp_dim=int(width * v.get("mlp_ratio", 4.0)), patch_size=v.get("patch_size", 16),
              image_size=v.get("image_size", 224), layout="deit", pool_type="tok",
              norm_pre=True, layer_norm_eps=1e-5,
              gelu="quick" if model_cfg.get("quick_gelu") else "exact")
  kw.update(overrides)
  return kw
