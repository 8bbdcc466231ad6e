"""big_vision checkpoints: its `load` (old-checkpoint fixes, scan and python-loop layouts,
`dont_load`, position-embedding resampling) and `from_big_vision`, the same conversion
(`_restore`, and the table resampled to the model's grid) checked against one of our models.

  params = big_vision.load(init_params, "siglip_b16_224.npz:img", model_cfg, dont_load)
  params = big_vision.from_big_vision("augreg_s16.npz", model, fresh=("head",))
"""

from __future__ import annotations

import logging
import os
import pathlib
import re
from typing import Any, Iterable, Mapping

import flax
import jax
import numpy as np

from tps_jax.checkpoints import files
from tps_jax.checkpoints.assemble import adapt_layout, assemble
from tps_jax.models import posemb as posemb_lib
from tps_jax.models.vit import VisionTransformer

_log = logging.getLogger(__name__)


def _flat(tree: Mapping) -> dict[str, Any]:
  return flax.traverse_util.flatten_dict(dict(tree), sep="/")


def _tree(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


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


def fix_old_checkpoints(params: Mapping, *, fold_cls: bool = True) -> dict:
  """big_vision's fixes of old ViT checkpoints: pre-linen names, the position embedding
  inside `Transformer` (or its `posembed_input`), a cls+patches position table (folded
  into cls unless `fold_cls` is False), and a MAP head's parts at the top level."""
  params = convert_pre_linen(params)
  t = params.get("Transformer", {})
  if "posembed_input" in t:
    params["pos_embedding"] = t.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in t:
    params["pos_embedding"] = t.pop("pos_embedding")
  if "pos_embedding" in params:
    pe = np.asarray(params["pos_embedding"])
    side = int(np.sqrt(pe.shape[1]))
    if fold_cls and side * side + 1 == pe.shape[1]:
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
  blocks = [_flat(t.pop(f"encoderblock_{i}")) for i in range(depth)]
  t["encoderblock"] = _tree({k: np.stack([np.asarray(b[k]) for b in blocks])
                                  for k in blocks[0]})
  params["Transformer"] = t
  return params


def scan_to_pyloop(params: Mapping) -> dict:
  """One stacked `Transformer/encoderblock` -> `Transformer/encoderblock_{i}`."""
  params = dict(params)
  t = dict(params["Transformer"])
  stacked = _flat(t.pop("encoderblock"))
  depth = len(next(iter(stacked.values())))
  for i in range(depth):
    t[f"encoderblock_{i}"] = _tree({k: np.asarray(v)[i] for k, v in stacked.items()})
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
  lf, inf = _flat(loaded), _flat(inited)
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
  return _tree(merged)


def resample_posemb(old: np.ndarray, new: np.ndarray) -> np.ndarray:
  """A learned position table `old` resized to `new`'s square grid (linear interpolation)."""
  if tuple(np.shape(old)) == tuple(np.shape(new)):
    return old
  _log.info("resizing the position embedding %s -> %s", np.shape(old), np.shape(new))
  return posemb_lib.resample(np.asarray(old), posemb_lib.grid_of(np.shape(new)[1]))


def load_tree(init_file: str | os.PathLike) -> dict:
  """A big_vision `.npz` (flat "a/b/c" names) as a tree; "file.npz:img" takes the subtree
  `img` (as SigLIP's image tower)."""
  path, key = str(init_file), None
  if not pathlib.Path(path).exists() and ":" in path:
    path, key = path.rsplit(":", 1)
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f"checkpoint {init_file} does not exist.")
  flat = files.read_npz(path)
  tree = _tree({re.sub(r"^params/", "", k): v for k, v in flat.items()})
  if key is not None:
    for part in key.split("/"):
      if part not in tree:
        raise KeyError(f"checkpoint {path} has no subtree {key!r}; top level: {sorted(tree)}")
      tree = tree[part]
  return tree


def load(init_params, init_file, model_cfg, dont_load=()):  # pylint: disable=invalid-name
  """big_vision's `vit.load`.

  Args:
    init_params: the model's initial params (its tree: what the result is shaped as), or None
      to take the checkpoint as it is.
    init_file: a path, "path:subtree" (SigLIP's "file.npz:img"), or a params tree.
    model_cfg: the model's config (its `scan` decides the layout of the blocks).
    dont_load: regexes of names kept at init. Score heads of a learned reduction are new:
      name them here (".*score_head.*").
  Returns:
    The params tree, old checkpoints fixed, converted between python-loop and scan layouts,
    merged with `init_params` and the position embedding resampled to the model's grid.
    Raises ValueError listing the names on one side only.
  """
  restored = _restore(init_file, scan=bool((model_cfg or {}).get("scan")), fold_cls=True)
  init_params = _plain_tree(init_params) if init_params is not None else None
  restored = merge_params(restored, init_params, dont_load)
  if init_params and "pos_embedding" in init_params and "pos_embedding" in restored:
    restored["pos_embedding"] = resample_posemb(restored["pos_embedding"],
                                                init_params["pos_embedding"])
  return restored


def _restore(source, *, scan: bool, fold_cls: bool) -> dict:
  """The one conversion of a big_vision checkpoint, shared by `load` and `from_big_vision`:
  read (a path, "path:subtree", a flat {"a/b/c": array} mapping or a tree), old checkpoints
  fixed, blocks in the model's layout (scanned or a python loop)."""
  if isinstance(source, (str, os.PathLike)):
    tree = load_tree(source)
  else:
    tree = _tree(source) if any("/" in k for k in source) else _plain_tree(source)
    tree = tree.get("params", tree) if set(tree) == {"params"} else tree
  tree = fix_old_checkpoints(tree, fold_cls=fold_cls)
  if "Transformer" in tree:
    if scan and "encoderblock" not in tree["Transformer"]:
      tree = pyloop_to_scan(tree)
    if not scan and "encoderblock" in tree["Transformer"]:
      tree = scan_to_pyloop(tree)
  return tree


def _plain_tree(tree) -> dict:
  """A (frozen) params tree as nested plain dicts of the same arrays."""
  return _tree({k: v for k, v in _flat(dict(tree)).items()})


def from_big_vision(source: str | os.PathLike | Mapping, model: VisionTransformer, *,
                    fresh: Iterable[str] = (), rng: jax.Array | None = None) -> dict:
  """A big_vision / AugReg ViT checkpoint -> params for `model`, every key and shape checked.

  Args:
    source: an `.npz` path ("path:subtree" takes a subtree), a flat {"a/b/c": array} mapping,
      or a params tree; old names are fixed as big_vision's `load` fixes them.
    model: the VisionTransformer to load into (either layout, scanned or not).
    fresh: parts to initialise anew ("head", "score_heads").
    rng: the seed of the fresh parts.
  Returns:
    The params tree. Raises CheckpointMismatchError naming missing, unexpected and
    misshapen keys.
  """
  tree = _restore(source, scan=model.scan, fold_cls=False)  # adapt_layout moves cls's position
  flat = {k: np.asarray(v) for k, v in _flat(tree).items()}
  if "head" in set(fresh):
    flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
  adapt_layout(flat, model, "npz", resample="linear")
  return assemble(flat, model, fresh=fresh, rng=rng, source="npz")
