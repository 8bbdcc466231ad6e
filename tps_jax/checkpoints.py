"""Parameters from any checkpoint: timm / DeiT / the authors' TPS, big_vision .npz, ours.

  params = checkpoints.load_params(path, model)  # any kind below, told apart by its form
  params = checkpoints.from_torch_state_dict(state_dict_or_path, model)
  params = checkpoints.from_big_vision_npz(path, model)

Both return a params tree for `model.apply({"params": params}, ...)`, check
every shape against the model, and report missing, unexpected and mismatched
keys by name. `fresh=("head",)` or `fresh=("score_heads",)` leaves those parts
freshly initialised (e.g. a dense DeiT checkpoint into a dTPS model).
Our own run directories (checksums, the newest intact step) are read by
`tps_jax.run_checkpoints`, which `load_params` calls for a directory.
"""

from __future__ import annotations

import os
import pathlib
import re
import zipfile
from typing import Any, Iterable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tps_jax.models.vit import VisionTransformer

FRESH_GROUPS = ("head", "score_heads")


class CheckpointMismatchError(ValueError):
  """The checkpoint and the model disagree (missing, unexpected or misshapen keys)."""


class CheckpointCorruptError(ValueError):
  """The checkpoint's bytes cannot be read (truncated, flipped, not the format it claims)."""


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict from `.npz`, `.safetensors` or `.pth` / `.pt` into numpy arrays."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint file {path} does not exist.")
  suffix = path.suffix.lower()
  if suffix == ".npz":
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      raise CheckpointCorruptError(f"checkpoint file {path} is not a readable .npz of arrays "
                                   f"(corrupt or truncated?): {e}") from e
  if suffix == ".safetensors":
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(f"reading {path} needs the `safetensors` package "
                        "(pip install safetensors).") from e
    return dict(load_file(str(path)))
  if suffix in (".pth", ".pt", ".bin"):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it to "
                        ".npz / .safetensors first.") from e
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in _unwrap(obj).items()}
  raise ValueError(f"unknown checkpoint format {suffix!r} for {path}; expected .npz, "
                   ".safetensors or .pth.")


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
  """DeiT checkpoints nest the weights under "model" (or "state_dict")."""
  for key in ("model", "state_dict", "module"):
    if key in sd and isinstance(sd[key], Mapping):
      return sd[key]
  return sd


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _torch_to_flat(sd: Mapping[str, np.ndarray], model: VisionTransformer) -> dict[str, np.ndarray]:
  """Maps timm-layout names and layouts to our flat "a/b/c" parameter names."""
  d, h = model.width, model.num_heads
  hd = d // h
  out: dict[str, np.ndarray] = {}
  unexpected, misfit = [], []
  for name, w in sd.items():
    w = np.asarray(w)
    try:
      if name == "cls_token":
        out["cls"] = w.reshape(1, 1, d)
      elif name == "pos_embed":
        out["pos_embedding"] = w
      elif name == "patch_embed.proj.weight":  # (D, C, p, p) -> (p, p, C, D)
        out["embedding/kernel"] = w.transpose(2, 3, 1, 0)
      elif name == "patch_embed.proj.bias":
        out["embedding/bias"] = w
      elif name in ("norm.weight", "norm.bias"):
        out["Transformer/encoder_norm/" + ("scale" if name.endswith("weight") else "bias")] = w
      elif name == "head.weight":
        out["head/kernel"] = w.T
      elif name == "head.bias":
        out["head/bias"] = w
      elif m := re.fullmatch(r"blocks\.(\d+)\.(.+)", name):
        _map_block(out, f"Transformer/encoderblock_{m.group(1)}", m.group(2), w, d, h, hd, name,
                   unexpected)
      elif m := re.fullmatch(r"score_predictor\.(\d+)\.(in_conv|out_conv)\.(\d)\.(weight|bias)", name):
        layer = {("in_conv", "0"): "LayerNorm_0", ("in_conv", "1"): "Dense_0",
                 ("out_conv", "0"): "Dense_1", ("out_conv", "2"): "Dense_2",
                 ("out_conv", "4"): "Dense_3"}.get((m.group(2), m.group(3)))
        if layer is None:
          unexpected.append(name)
          continue
        prefix = f"Transformer/score_head_{m.group(1)}/{layer}/"
        if layer.startswith("LayerNorm"):
          out[prefix + ("scale" if m.group(4) == "weight" else "bias")] = w
        else:
          out[prefix + ("kernel" if m.group(4) == "weight" else "bias")] = w.T if w.ndim == 2 else w
      else:
        unexpected.append(name)
    except ValueError:  # a reshape that the model's width / heads cannot take
      misfit.append(f"{name} {tuple(w.shape)}")
  if misfit:
    raise CheckpointMismatchError(
        f"state dict arrays that do not fit a model of width {d} with {h} heads: {misfit}")
  if unexpected:
    raise CheckpointMismatchError(
        f"unexpected keys in the state dict (no place in this model): {sorted(unexpected)}")
  return out


def _map_block(out, prefix, rest, w, d, h, hd, name, unexpected):
  norm = {"norm1": "LayerNorm_0", "norm2": "LayerNorm_1"}
  attn = f"{prefix}/MultiHeadDotProductAttention_0"
  if m := re.fullmatch(r"(norm1|norm2)\.(weight|bias)", rest):
    out[f"{prefix}/{norm[m.group(1)]}/" + ("scale" if m.group(2) == "weight" else "bias")] = w
  elif rest == "attn.qkv.weight":  # (3D, D) -> three (D, H, hd)
    for part, wi in zip(("query", "key", "value"), np.split(w, 3, axis=0)):
      out[f"{attn}/{part}/kernel"] = wi.T.reshape(d, h, hd)
  elif rest == "attn.qkv.bias":
    for part, bi in zip(("query", "key", "value"), np.split(w, 3)):
      out[f"{attn}/{part}/bias"] = bi.reshape(h, hd)
  elif rest == "attn.proj.weight":  # (D, D) -> (H, hd, D)
    out[f"{attn}/out/kernel"] = w.T.reshape(h, hd, d)
  elif rest == "attn.proj.bias":
    out[f"{attn}/out/bias"] = w
  elif m := re.fullmatch(r"mlp\.fc([12])\.(weight|bias)", rest):
    dense = f"{prefix}/MlpBlock_0/Dense_{int(m.group(1)) - 1}/"
    out[dense + ("kernel" if m.group(2) == "weight" else "bias")] = w.T if w.ndim == 2 else w
  else:
    unexpected.append(name)


def _big_vision_to_flat(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision / vision_transformer (AugReg) names -> ours."""
  renames = [
      (r"^params/", ""),
      (r"^Transformer/posembed_input/pos_embedding$", "pos_embedding"),
      (r"(encoderblock_\d+)/LayerNorm_2/", r"\1/LayerNorm_1/"),
      (r"(encoderblock_\d+)/MlpBlock_3/", r"\1/MlpBlock_0/"),
      (r"(encoderblock_\d+)/MultiHeadDotProductAttention_1/", r"\1/MultiHeadDotProductAttention_0/"),
  ]
  out = {}
  for k, v in flat.items():
    for pat, rep in renames:
      k = re.sub(pat, rep, k)
    out[k] = np.asarray(v)
  return out


def _adapt_layout(flat: dict[str, np.ndarray], model: VisionTransformer, source: str) -> None:
  """Converts between DeiT (cls has a position) and big_vision (patches only) layouts."""
  if "pos_embedding" not in flat or "cls" not in flat:
    return
  pos = flat["pos_embedding"]
  n0 = model.num_patches
  if pos.shape[1] == n0 + 1 and model.layout == "big_vision":
    # Fold cls's position into cls: exact, since cls is the same for every image.
    flat["cls"] = flat["cls"] + pos[:, :1]
    flat["pos_embedding"] = pos[:, 1:]
  elif pos.shape[1] == n0 and model.layout == "deit":
    flat["pos_embedding"] = np.concatenate([np.zeros_like(pos[:, :1]), pos], axis=1)
  elif pos.shape[1] not in (n0, n0 + 1):
    raise CheckpointMismatchError(
        f"pos_embedding in the {source} has {pos.shape[1]} positions; this model has {n0} "
        f"patches ({model.image_size}px / {model.patch_size}); resize the position embedding "
        f"or build the model at the checkpoint's image size.")


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


def from_torch_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike,
                          model: VisionTransformer, *, fresh: Iterable[str] = (),
                          rng: jax.Array | None = None) -> dict:
  """A timm / DeiT / authors'-TPS state dict (mapping or file) -> params for `model`."""
  if getattr(model, "gelu", "exact") != "exact":
    raise ValueError(f"timm / DeiT checkpoints use the exact (erf) GELU, but this model has "
                     f"gelu={model.gelu!r}; build it with gelu='exact' (their logits differ by "
                     f"about 6e-4 otherwise).")
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict(state_dict)
  sd = _strip_prefix(_unwrap(state_dict), "module.")
  sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in sd.items()}
  fresh = set(fresh)
  if "head" in fresh:
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
  if "score_heads" in fresh:
    sd = {k: v for k, v in sd.items() if not k.startswith("score_predictor.")}
  flat = _torch_to_flat(sd, model)
  _adapt_layout(flat, model, "state dict")
  return assemble(flat, model, fresh=fresh, rng=rng, source="state dict")


def from_big_vision_npz(path: str | os.PathLike | Mapping[str, np.ndarray],
                        model: VisionTransformer, *, fresh: Iterable[str] = (),
                        rng: jax.Array | None = None) -> dict:
  """A big_vision / AugReg ViT `.npz` (flat "a/b/c" keys) -> params for `model`."""
  flat = load_state_dict(path) if isinstance(path, (str, os.PathLike)) else dict(path)
  flat = _big_vision_to_flat(flat)
  if "head" in fresh:
    flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
  _adapt_layout(flat, model, "npz")
  return assemble(flat, model, fresh=fresh, rng=rng, source="npz")


def to_flat(params) -> dict[str, np.ndarray]:
  """params tree -> {"a/b/c": numpy array}, e.g. to save as a big_vision-style .npz."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


# ---------------------------------------------------------------------------------------------
# Any kind, told apart by its form (our own runs: tps_jax.run_checkpoints).


def load_params(path: str | os.PathLike, model: VisionTransformer, *,
                fresh: Iterable[str] = (), rng: jax.Array | None = None) -> Any:
  """Parameters for `model` from a checkpoint of any kind this library reads.

  - a directory: a tps_jax workdir (its newest intact step) or one Orbax step of it;
  - `.npz` with "a/b/c" keys: ours (`params.npz`) or big_vision / AugReg;
  - `.npz` / `.safetensors` / `.pth` with "a.b.c" keys: a timm / DeiT / TPS state dict.
  Mismatches raise `CheckpointMismatchError` naming the keys.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist.")
  if path.is_dir():  # assemble ignores (and re-initialises) the `fresh` groups itself
    from tps_jax import run_checkpoints  # pylint: disable=g-import-not-at-top (imports us)
    return assemble(run_checkpoints.read_params(path), model, fresh=fresh, rng=rng,
                    source=f"checkpoint {path}")
  flat = load_state_dict(path)
  if any("/" in k for k in flat):
    return from_big_vision_npz(flat, model, fresh=fresh, rng=rng)
  return from_torch_state_dict(flat, model, fresh=fresh, rng=rng)
