"""A model and its parameters from a downloaded Hugging Face Hub directory: timm's,
transformers' or OpenCLIP's.

  model, params = checkpoints.from_pretrained("vit_small_patch14_reg4_dinov2.lvd142m/",
                                              image_size=224, reduction="tome")
  logits, out = model.apply({"params": params}, images_nhwc)

The directory is what `huggingface_hub.snapshot_download` leaves: a `config.json` (OpenCLIP:
`open_clip_config.json`) and the weights (`model.safetensors`, sharded with its `.index.json`,
`pytorch_model.bin`, OpenCLIP's `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`).
timm's config names its model (`architecture`, the tag in `pretrained_cfg`), read by
`models.timm_names`; transformers' has a `model_type`, read by `models.hf_config`; OpenCLIP's
gives its image tower's sizes (`vision_cfg`), or the timm model it is built on
(`timm_model_name`, whose `visual.trunk.*` weights are timm's). The number of classes is the
checkpoint's head's (0 without one; an OpenCLIP tower's projection width); nothing is
downloaded here.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from tps_jax.checkpoints.files import load_state_dict
from tps_jax.checkpoints.hf import is_transformers, to_timm
from tps_jax.checkpoints.timm import from_openclip, from_torch_state_dict
from tps_jax.models import hf_config, timm_names
from tps_jax.models.vit import Model, VisionTransformer

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# OpenCLIP's own tower: the vision_cfg keys read (any other is a named error)
_OPENCLIP_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}
_TRUNK = "visual.trunk."


def _openclip_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """`Model`'s keyword arguments from an `open_clip_config.json`."""
  model_cfg = config.get("model_cfg", config)
  v = dict(model_cfg.get("vision_cfg") or {})
  if v.get("timm_model_name"):
    if v.get("timm_proj", "none") not in ("none", None) or v.get("timm_pool") == "avg":
      raise ValueError(f"OpenCLIP's timm tower {v['timm_model_name']!r} with timm_proj "
                       f"{v.get('timm_proj')!r} / timm_pool {v.get('timm_pool')!r} is not read; "
                       "towers without a projection (timm_proj 'none') are.")
    return timm_names.model_kwargs(v["timm_model_name"], image_size=v.get("image_size", 224))
  other = sorted(set(v) - _OPENCLIP_KEYS)
  if other:
    raise ValueError(f"OpenCLIP vision_cfg keys {other} are not read; a plain ViT tower "
                     f"takes {sorted(_OPENCLIP_KEYS)}.")
  width = v.get("width", 768)
  return dict(width=width, depth=v.get("layers", 12), num_heads=width // v.get("head_width", 64),
              mlp_dim=int(width * v.get("mlp_ratio", 4.0)), patch_size=v.get("patch_size", 16),
              image_size=v.get("image_size", 224), layout="deit", pool_type="tok",
              norm_pre=True, layer_norm_eps=1e-5,
              gelu="quick" if model_cfg.get("quick_gelu") else "exact")


def read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict of a Hub directory (every shard of a sharded one)."""
  for name in WEIGHTS:
    path = directory / name
    if not path.exists():
      continue
    if name.endswith(".index.json"):
      shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
      out: dict[str, np.ndarray] = {}
      for shard in shards:
        out.update(load_state_dict(directory / shard))
      return out
    return load_state_dict(path)
  raise FileNotFoundError(f"no weights in {directory}: expected one of {WEIGHTS}.")


def is_hub_directory(path: pathlib.Path) -> bool:
  """A downloaded Hub directory: a config and weights, as `from_pretrained` reads."""
  return (path.is_dir() and any((path / n).exists() for n in ("config.json",
                                                                "open_clip_config.json"))
          and any((path / n).exists() for n in WEIGHTS))


def hub_state_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """A Hub directory's weights, an OpenCLIP tower built on timm as timm's state dict."""
  sd = read_weights(directory)
  if any(k.startswith(_TRUNK) for k in sd):  # built on timm: its weights are timm's
    sd = {k[len(_TRUNK):]: v for k, v in sd.items() if k.startswith(_TRUNK)}
  return sd


def _head_outputs(sd: dict[str, Any]) -> int:
  """The checkpoint's classes (or projection width): its head's rows, in timm's names."""
  if any(k.startswith("visual.") for k in sd):
    sd = from_openclip(sd)
  elif is_transformers(sd):
    sd = to_timm(sd)
  return int(np.shape(sd["head.weight"])[0]) if "head.weight" in sd else 0


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """`Model`'s keyword arguments from a timm or transformers `config.json`."""
  if "architecture" in config:  # timm
    pretrained = config.get("pretrained_cfg") or {}
    name = config["architecture"] + (f".{pretrained['tag']}" if pretrained.get("tag") else "")
    # "avg" pools the patches (MAE's fine-tuning form); any other is the family's own
    kw = timm_names.model_kwargs(name, global_pool="avg" if config.get("global_pool") == "avg"
                                 else None)
    if pretrained.get("input_size"):
      kw["image_size"] = tuple(pretrained["input_size"][-2:])
      if kw["image_size"][0] == kw["image_size"][1]:
        kw["image_size"] = kw["image_size"][0]
    return kw
  if "model_type" in config:  # transformers
    return hf_config.model_kwargs(config)
  raise ValueError("config.json names neither a timm model ('architecture') nor a "
                   "transformers one ('model_type').")


def from_pretrained(path: str | os.PathLike, *, num_classes: int | None = None,
                    **overrides: Any) -> tuple[VisionTransformer, dict]:
  """(model, params) from a Hub directory of a timm, transformers or OpenCLIP ViT.

  Args:
    path: the directory (`config.json` or `open_clip_config.json`, and the weights).
    num_classes: the head's outputs; None: the checkpoint's (0 without a head). Another
      number initialises the head anew.
    **overrides: `Model` arguments replacing the config's (image_size, reduction, dtype, ...).
  Returns:
    The model and its parameters. Raises FileNotFoundError, ValueError (a config it does not
    read) or CheckpointMismatchError (naming the keys).
  """
  directory = pathlib.Path(path)
  config_path, openclip = directory / "config.json", directory / "open_clip_config.json"
  if openclip.exists() and not config_path.exists():
    kw = _openclip_kwargs(json.loads(openclip.read_text()))
  elif not config_path.exists():
    raise FileNotFoundError(f"{config_path} does not exist: give a downloaded Hub directory.")
  else:
    kw = model_kwargs(json.loads(config_path.read_text()))
  kw.update(overrides)
  sd = hub_state_dict(directory)
  own = _head_outputs(sd)
  classes = own if num_classes is None else num_classes
  model = Model(classes, **kw)
  fresh = ("head",) if classes != own else ()
  return model, from_torch_state_dict(sd, model, fresh=fresh)
