"""The `Model` settings of a Hugging Face transformers ViT, from its `config.json`.

  kw = hf_config.model_kwargs("siglip-so400m-patch14-384/config.json", image_size=384)
  model = Model(0, **kw, reduction="etps")   # then checkpoints.load_params(file, model)

A checkpoint's tensors do not say everything a model needs: the GELU, the LayerNorm
epsilon, where the position table starts, how the tokens are pooled. transformers' config
says it; this module reads the `model_type`s docs/model.md lists (each checked against
transformers' own forward by tests/test_hf.py):

  clip, clip_vision_model           CLIP's image tower: pre-norm, cls pooled and normalised
  siglip, siglip_vision_model       SigLIP's: MAP head (or, without it, every token), no cls
  dinov2, dinov2_with_registers     DINOv2: layer scale, registers, SwiGLU where the config says
  vit                               Google's ViT (ViTModel / ViTForImageClassification)

The two-tower configs (`clip`, `siglip`) are read through their `vision_config`, and so is a
vision-language model's whose `vision_config` is one of them (LLaVA's CLIP, PaliGemma's
SigLIP).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

# transformers' `hidden_act` -> our GELU (layers.GELUS)
_ACTS = {"gelu": "exact", "quick_gelu": "quick", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
         "gelu_fast": "tanh"}
# Each vision config's defaults, as transformers' config classes set them (5.25): a saved
# config.json leaves out what equals them (a two-tower model's vision_config often holds
# only its sizes).
_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=224,
             num_channels=3, intermediate_size=3072)
DEFAULTS = {
    "clip_vision_model": dict(_BASE, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5),
    "siglip_vision_model": dict(_BASE, patch_size=16, hidden_act="gelu_pytorch_tanh",
                                layer_norm_eps=1e-6, vision_use_head=True),
    "dinov2": dict(_BASE, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, mlp_ratio=4,
                   layerscale_value=1.0, use_swiglu_ffn=False),
    "dinov2_with_registers": dict(_BASE, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                                  mlp_ratio=4, layerscale_value=1.0, use_swiglu_ffn=False,
                                  num_register_tokens=4),
    "vit": dict(_BASE, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-12),
}
MODEL_TYPES = ("clip", "siglip", *DEFAULTS)


def read_config(config: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
  """A config as a dict: a mapping, a `config.json` path, or the directory holding one."""
  if isinstance(config, Mapping):
    return dict(config)
  path = pathlib.Path(config)
  if path.is_dir():
    path = path / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"transformers config {path} does not exist.")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"transformers config {path} is not JSON: {e}") from None


def _swiglu_width(c: Mapping[str, Any]) -> int:
  """DINOv2's SwiGLU: hidden = int(D mlp_ratio), gated width (2/3 hidden rounded up to 8),
  packed as twice that (layers.MLPS)."""
  hidden = int(c["hidden_size"] * c.get("mlp_ratio", 4))
  return 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8)


def model_kwargs(config: Mapping[str, Any] | str | os.PathLike, **overrides: Any) -> dict[str, Any]:
  """`Model`'s keyword arguments (sizes, layout, pooling, GELU, epsilon, layer scale,
  registers, MLP) for a transformers config; `overrides` (image_size, reduction, dtype, ...)
  replace the rest. Raises ValueError naming a model type or activation it does not read."""
  c = read_config(config)
  kind = c.get("model_type")
  if kind in ("clip", "siglip"):
    c, kind = dict(c.get("vision_config") or {}), f"{kind}_vision_model"
  elif kind not in DEFAULTS and (c.get("vision_config") or {}).get("model_type") in DEFAULTS:
    c = dict(c["vision_config"])  # a vision-language model's tower (LLaVA, PaliGemma, ...)
    kind = c["model_type"]
  if kind not in DEFAULTS:
    raise ValueError(f"unknown transformers model_type {kind!r}; the ViTs read are "
                     f"{MODEL_TYPES} (docs/model.md).")
  c = {**DEFAULTS[kind], **c}
  act = c["hidden_act"]
  if act not in _ACTS:
    raise ValueError(f"unknown hidden_act {act!r} in the {kind} config; expected one of "
                     f"{sorted(_ACTS)}.")
  dinov2 = kind.startswith("dinov2")
  kw: dict[str, Any] = dict(
      width=c["hidden_size"], depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
      patch_size=c["patch_size"], image_size=c["image_size"],
      layer_norm_eps=c["layer_norm_eps"], gelu=_ACTS[act], channels=c["num_channels"],
      layout="deit", pool_type="tok",
      mlp_dim=(_swiglu_width(c) if c.get("use_swiglu_ffn") else
               int(c["hidden_size"] * c["mlp_ratio"]) if dinov2 else c["intermediate_size"]))
  if kind == "clip_vision_model":
    kw.update(norm_pre=True)
  elif kind == "siglip_vision_model":
    kw.update(layout="big_vision", pool_type="map" if c["vision_use_head"] else "none")
  elif dinov2:
    kw.update(layer_scale=c["layerscale_value"])
    if c.get("use_swiglu_ffn"):
      kw.update(mlp="swiglu")
    if c.get("num_register_tokens"):
      kw.update(num_registers=int(c["num_register_tokens"]), layout="big_vision")
  kw.update(overrides)
  return kw
