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

import logging
import os
import pathlib
import re
import sys
from typing import Any, Iterable, Mapping

import jax.numpy as jnp
import numpy as np

from tps_jax.models import posemb as posemb_lib
from tps_jax.models import vit

DEFAULTS = dict(patch_size=(16, 16), width=768, depth=12, mlp_dim=None, num_heads=12,
                posemb="learn", rep_size=False, dropout=0.0, pool_type="gap",
                head_zeroinit=True, scan=False, remat_policy="nothing_saveable",
                dtype_mm="float32")
OURS = ("reduction", "policy_form", "attention", "gelu", "image_size", "channels", "drop_path",
        "remat", "layer_norm_eps", "gumbel_noise")
_log = logging.getLogger(__name__)


def decode_variant(variant: str | None) -> dict[str, Any]:
  """big_vision's `decode_variant`: "B" or "B/32" -> sizes (and patch_size as a pair)."""
  out = vit.decode_variant(variant)
  if "patch_size" in out:
    out["patch_size"] = (out["patch_size"],) * 2
  return out


def Model(num_classes: int | None = None, *, variant: str | None = None,  # noqa: N802
          **kw) -> vit.VisionTransformer:
  """big_vision's `vit.Model(num_classes, *, variant, **kw)`, reducible (`reduction=`)."""
  unknown = sorted(set(kw) - set(DEFAULTS) - set(OURS))
  if unknown:
    raise ValueError(f"unknown ViT fields {unknown}; big_vision's are {sorted(DEFAULTS)}, "
                     f"tps_jax adds {sorted(OURS)}.")
  cfg = {**DEFAULTS, **decode_variant(variant), **kw}
  dtype = cfg.pop("dtype_mm")
  cfg.setdefault("gelu", "tanh")
  cfg.setdefault("image_size", None)
  return vit.Model(num_classes, layout="big_vision", dtype=jnp.dtype(dtype), outputs_2d=True,
                   **cfg)


# --- checkpoints: big_vision's `load` -------------------------------------------------------

def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(_flatten(v, name + "/"))
    else:
      out[name] = v
  return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
  tree: dict = {}
  for name, v in flat.items():
    node = tree
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _natural_key(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def convert_pre_linen(tree):
  """Pre-linen module names ("MlpBlock_3", "LayerNorm_2" in one scope) -> linen's, numbered
  from 0 per module type in the order they were defined (flax's `convert_pre_linen`)."""
  if not isinstance(tree, Mapping):
    return tree
  counts: dict[str, int] = {}
  out = {}
  for name in sorted(tree, key=_natural_key):
    new = name
    if m := re.fullmatch(r"(.*)_\d+", name):
      module = m.group(1)
      new = f"{module}_{counts.get(module, 0)}"
      counts[module] = counts.get(module, 0) + 1
    out[new] = convert_pre_linen(tree[name])
  return out


def fix_old_checkpoints(params: Mapping) -> dict:
  """big_vision's fixes of old ViT checkpoints: pre-linen names, the position embedding
  inside `Transformer` (or its `posembed_input`), a cls+patches position table (folded
  into cls), and a MAP head's parts at the top level."""
  params = convert_pre_linen(params)
  t = params.get("Transformer", {})
  if "posembed_input" in t:
    params["pos_embedding"] = t.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in t:
    params["pos_embedding"] = t.pop("pos_embedding")
  if "pos_embedding" in params:
    pe = np.asarray(params["pos_embedding"])
    side = int(np.sqrt(pe.shape[1]))
    if side * side + 1 == pe.shape[1]:
      params["pos_embedding"] = pe[:, 1:]
      if "cls" in params:
        params["cls"] = np.asarray(params["cls"]) + pe[:, :1]
  if "probe" in params:
    params["MAPHead_0"] = {k: params.pop(k) for k in
                           ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0",
                            "LayerNorm_0")}
  return params


def pyloop_to_scan(params: Mapping) -> dict:
  """`Transformer/encoderblock_{i}` (python loop) -> one stacked `Transformer/encoderblock`."""
  params = dict(params)
  t = dict(params["Transformer"])
  names = sorted((k for k in t if re.fullmatch(r"encoderblock_\d+", k)), key=_natural_key)
  depth = len(names)
  if [int(n.split("_")[-1]) for n in names] != list(range(depth)):
    raise ValueError(f"encoder blocks are not numbered 0..{depth - 1}: {names}")
  blocks = [_flatten(t.pop(f"encoderblock_{i}")) for i in range(depth)]
  t["encoderblock"] = _unflatten({k: np.stack([np.asarray(b[k]) for b in blocks])
                                  for k in blocks[0]})
  params["Transformer"] = t
  return params


def scan_to_pyloop(params: Mapping) -> dict:
  """One stacked `Transformer/encoderblock` -> `Transformer/encoderblock_{i}`."""
  params = dict(params)
  t = dict(params["Transformer"])
  stacked = _flatten(t.pop("encoderblock"))
  depth = len(next(iter(stacked.values())))
  for i in range(depth):
    t[f"encoderblock_{i}"] = _unflatten({k: np.asarray(v)[i] for k, v in stacked.items()})
  params["Transformer"] = t
  return params


def merge_params(loaded: Mapping, inited: Mapping | None, dont_load: Iterable[str] = ()) -> dict:
  """`loaded` shaped as `inited`: every name of `inited` from `loaded` except those a
  `dont_load` regex fully matches (kept at init). Names on one side only that no regex
  covers are an error that lists them (big_vision's `merge_params`)."""
  if inited is None:
    return dict(loaded)
  patterns = [re.compile(p) for p in dont_load]
  skip = lambda name: any(p.fullmatch(name) for p in patterns)
  lf, inf = _flatten(loaded), _flatten(inited)
  merged = {k: (lf[k] if k in lf and not skip(k) else v) for k, v in inf.items()}
  missing = sorted(k for k in inf.keys() - lf.keys() if not skip(k))
  extra = sorted(k for k in lf.keys() - inf.keys() if not skip(k))
  if missing or extra:
    lines = ["the checkpoint does not match the model (big_vision's merge_params):"]
    if missing:
      lines += ["params in the model (code) but not in the checkpoint and not `dont_load`ed:"]
      lines += [f" - {k}" for k in missing]
    if extra:
      lines += ["params in the checkpoint but not in the model (code) and not `dont_load`ed:"]
      lines += [f" + {k}" for k in extra]
    raise ValueError("\n".join(lines))
  bad = sorted(f"{k}: checkpoint {np.shape(lf[k])} vs model {np.shape(v)}"
               for k, v in inf.items() if k in lf and not skip(k) and k != "pos_embedding"
               and np.shape(lf[k]) != np.shape(v))
  if bad:
    raise ValueError("checkpoint arrays of the wrong shape for this model:\n  " +
                     "\n  ".join(bad))
  return _unflatten(merged)


def resample_posemb(old: np.ndarray, new: np.ndarray) -> np.ndarray:
  """A learned position table `old` resized to `new`'s square grid (linear interpolation)."""
  if tuple(np.shape(old)) == tuple(np.shape(new)):
    return old
  _log.info("resizing the position embedding %s -> %s", np.shape(old), np.shape(new))
  return posemb_lib.resample(np.asarray(old), posemb_lib.grid_of(np.shape(new)[1]))


def load_params(init_file: str | os.PathLike) -> dict:
  """A big_vision `.npz` (flat "a/b/c" names) as a tree; "file.npz:img" takes the subtree
  `img` (as SigLIP's image tower)."""
  path, key = str(init_file), None
  if not pathlib.Path(path).exists() and ":" in path:
    path, key = path.rsplit(":", 1)
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f"checkpoint {init_file} does not exist.")
  try:
    with np.load(path, allow_pickle=False) as data:
      flat = {k: data[k] for k in data.files}
  except (ValueError, OSError, EOFError) as e:
    raise ValueError(f"checkpoint {path} is not a readable .npz of arrays: {e}") from e
  tree = _unflatten({re.sub(r"^params/", "", k): v for k, v in flat.items()})
  if key is not None:
    for part in key.split("/"):
      if part not in tree:
        raise KeyError(f"checkpoint {path} has no subtree {key!r}; top level: {sorted(tree)}")
      tree = tree[part]
  return tree


def load(init_params, init_file, model_cfg, dont_load=()):  # pylint: disable=invalid-name
  """big_vision's `vit.load`: a checkpoint (path, "path:subtree", or a params tree) into the
  model of `model_cfg`, fixing old checkpoints, converting between python-loop and scan
  layouts, merging with `init_params` under `dont_load` and resampling the position
  embedding to the model's grid. Score heads of a learned reduction are new: name them in
  `dont_load` (".*score_head.*") to keep their initial values."""
  restored = (load_params(init_file) if isinstance(init_file, (str, os.PathLike))
              else _unflatten(_flatten(init_file)))
  restored = fix_old_checkpoints(restored)
  scan = bool((model_cfg or {}).get("scan"))
  if "Transformer" in restored:
    if scan and "encoderblock" not in restored["Transformer"]:
      restored = pyloop_to_scan(restored)
    if not scan and "encoderblock" in restored["Transformer"]:
      restored = scan_to_pyloop(restored)
  init_params = _plain_tree(init_params) if init_params is not None else None
  restored = merge_params(restored, init_params, dont_load)
  if init_params and "pos_embedding" in init_params and "pos_embedding" in restored:
    restored["pos_embedding"] = resample_posemb(restored["pos_embedding"],
                                                init_params["pos_embedding"])
  return restored


def _plain_tree(tree) -> dict:
  """A (frozen) params tree as nested plain dicts of the same arrays."""
  return _unflatten({k: v for k, v in _flatten(dict(tree)).items()})


def register(name: str = "tps_vit") -> None:
  """Makes `importlib.import_module("big_vision.models.<name>")` return this module, so a
  big_vision config's `model_name = "<name>"` builds (and `load`s) tps_jax's ViT."""
  if not re.fullmatch(r"\w+", name):
    raise ValueError(f"model name {name!r} must be a Python identifier.")
  module = sys.modules[__name__]
  sys.modules[f"big_vision.models.{name}"] = module
  parent = sys.modules.get("big_vision.models")
  if parent is not None:
    setattr(parent, name, module)
