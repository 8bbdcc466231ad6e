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

The two-tower configs (`clip`, `siglip`) are read through their `vision_config`.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

# transformers' `hidden_act` -> our GELU (layers.GELUS)
_ACTS = {"gelu": "exact", "quick_gelu": "quick", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
         "gelu_fast": "tanh"}
MODEL_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model", "dinov2",
               "dinov2_with_registers", "vit")


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
  if kind not in MODEL_TYPES:
    raise ValueError(f"unknown transformers model_type {kind!r}; the ViTs read are "
                     f"{MODEL_TYPES} (docs/model.md).")
  act = c.get("hidden_act", "gelu")
  if act not in _ACTS:
    raise ValueError(f"unknown hidden_act {act!r} in the {kind} config; expected one of "
                     f"{sorted(_ACTS)}.")
  dinov2 = kind.startswith("dinov2")
  kw: dict[str, Any] = dict(
      width=c.get("hidden_size", 768), depth=c.get("num_hidden_layers", 12),
      num_heads=c.get("num_attention_heads", 12), patch_size=c.get("patch_size", 16),
      image_size=c.get("image_size", 224), layer_norm_eps=c.get("layer_norm_eps", 1e-5),
      gelu=_ACTS[act], channels=c.get("num_channels", 3), layout="deit", pool_type="tok",
      mlp_dim=(_swiglu_width(c) if c.get("use_swiglu_ffn") else
               int(c["hidden_size"] * c.get("mlp_ratio", 4)) if dinov2
               else c.get("intermediate_size", 3072)))
  if kind == "clip_vision_model":
    kw.update(norm_pre=True)
  elif kind == "siglip_vision_model":
    kw.update(layout="big_vision", pool_type="map" if c.get("vision_use_head", True) else "none")
  elif dinov2:
    kw.update(layer_scale=c.get("layerscale_value", 1.0))
    if c.get("use_swiglu_ffn"):
      kw.update(mlp="swiglu")
    if c.get("num_register_tokens"):
      kw.update(num_registers=int(c["num_register_tokens"]), layout="big_vision")
  kw.update(overrides)
  return kw
