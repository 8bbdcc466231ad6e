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
from tps_jax.checkpoints.timm import from_torch_state_dict
from tps_jax.models import hf_config, openclip_config, timm_names
from tps_jax.models.vit import Model, VisionTransformer

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json", "open_clip_model.safetensors",
           "open_clip_pytorch_model.bin")
_TRUNK = "visual.trunk."  # an OpenCLIP tower built on a timm model


def _weights_file(directory: pathlib.Path) -> pathlib.Path:
  for name in WEIGHTS:
    if (directory / name).exists():
      return directory / name
  raise FileNotFoundError(f"no weights in {directory}: expected one of {WEIGHTS}.")


def weight_names(directory: pathlib.Path) -> list[str]:
  """The tensor names of a Hub directory, read from its index or safetensors header (the
  arrays are not read; a `.bin` is)."""
  path = _weights_file(directory)
  if path.name.endswith(".index.json"):
    return list(json.loads(path.read_text())["weight_map"])
  if path.suffix == ".safetensors":
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    with safe_open(str(path), framework="numpy") as f:
      return list(f.keys())
  return list(load_state_dict(path))


def read_weights(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict of a Hub directory (every shard of a sharded one; of a vision-language
  model only the shards that hold its image tower)."""
  path = _weights_file(directory)
  if not path.name.endswith(".index.json"):
    return load_state_dict(path)
  weight_map = json.loads(path.read_text())["weight_map"]
  tower = {f for k, f in weight_map.items() if ".vision_model." in k}
  out: dict[str, np.ndarray] = {}
  for shard in sorted(tower or set(weight_map.values())):
    out.update(load_state_dict(directory / shard))
  return out


def _config(path: pathlib.Path) -> dict[str, Any] | None:
  """A Hub directory's config (OpenCLIP's as {"open_clip": ...}), or None where there is none
  that names a model."""
  if (path / "config.json").exists():
    try:
      config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
      return None
    return config if "architecture" in config or "model_type" in config else None
  if (path / "open_clip_config.json").exists():
    return {"open_clip": json.loads((path / "open_clip_config.json").read_text())}
  return None


def hub_config(directory: pathlib.Path) -> dict[str, Any]:
  """A Hub directory's config (`model_kwargs` reads it); a named error where there is none."""
  config = _config(directory)
  if config is None:
    raise FileNotFoundError(
        f"{directory} holds no config.json naming a timm model ('architecture') or a "
        "transformers one ('model_type'), nor an open_clip_config.json: give a downloaded Hub "
        "directory.")
  return config


def is_hub_directory(path: pathlib.Path) -> bool:
  """A downloaded Hub directory: a config naming a model (not a tps_jax workdir's) and
  weights, as `from_pretrained` reads."""
  return (path.is_dir() and any((path / n).exists() for n in WEIGHTS)
          and _config(path) is not None)


def hub_state_dict(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """A Hub directory's weights, an OpenCLIP tower built on timm as timm's state dict."""
  sd = read_weights(directory)
  if any(k.startswith(_TRUNK) for k in sd):  # built on timm: its weights are timm's
    sd = {k[len(_TRUNK):]: v for k, v in sd.items() if k.startswith(_TRUNK)}
  return sd


def _head_outputs(sd: dict[str, Any]) -> int:
  """The checkpoint's classes (or projection width): its head's rows, 0 without one."""
  for key in ("head.weight", "classifier.weight", "visual_projection.weight"):
    if key in sd:
      return int(np.shape(sd[key])[0])
  return int(np.shape(sd["visual.proj"])[1]) if "visual.proj" in sd else 0


def hub_model_kwargs(directory: pathlib.Path) -> dict[str, Any]:
  """`Model`'s keyword arguments for a Hub directory: its config's, and `rep_size` where its
  weights hold a pooler (transformers' ViTModel: Dense + tanh on cls)."""
  kw = model_kwargs(hub_config(directory))
  if any(k.endswith("pooler.dense.weight") for k in weight_names(directory)):
    kw["rep_size"] = True
  return kw


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """`Model`'s keyword arguments from a Hub directory's config (`_config`)."""
  if "open_clip" in config:
    return openclip_config.model_kwargs(config["open_clip"])
  if "architecture" in config:  # timm
    pretrained = config.get("pretrained_cfg") or {}
    name = config["architecture"] + (f".{pretrained['tag']}" if pretrained.get("tag") else "")
    args = dict(config.get("model_args") or {})  # timm's create_model overrides
    other = sorted(set(args) - {"img_size", "global_pool", "num_classes"})
    if other:
      raise ValueError(f"timm model_args {other} of {name!r} are not read (img_size and "
                       "global_pool are; num_classes is the checkpoint's head's).")
    kw = timm_names.model_kwargs(name)
    # "avg" where the family does not pool so (MAE's fine-tuning form); any other value
    # ("token", "map", "") is the family's own pooling
    pool = args.get("global_pool", config.get("global_pool"))
    if pool == "avg" and kw["pool_type"] != "gap":
      kw = timm_names.model_kwargs(name, global_pool="avg")
    size = args.get("img_size") or (pretrained.get("input_size") or [])[-2:]
    if size:  # an int or (H, W)
      h, w = (size, size) if isinstance(size, int) else size
      kw["image_size"] = h if h == w else (h, w)
    return kw
  return hf_config.model_kwargs(config)


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
  kw = {**hub_model_kwargs(directory), **overrides}
  sd = hub_state_dict(directory)
  own = _head_outputs(sd)
  classes = own if num_classes is None else num_classes
  model = Model(classes, **kw)
  fresh = ("head",) if classes != own else ()
  return model, from_torch_state_dict(sd, model, fresh=fresh)
