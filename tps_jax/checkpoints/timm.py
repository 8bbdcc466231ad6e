"""timm / DeiT / OpenCLIP / Hugging Face / the authors' TPS PyTorch state dicts -> our
parameters.

timm's names (`cls_token`, `reg_token`, `pos_embed`, `patch_embed.proj`, `norm_pre`,
`blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}`, `norm`,
`fc_norm`, `attn_pool.{latent,q,kv,proj,norm,mlp}`, `head`) cover DeiT, DeiT III, DINOv2
(with registers), CLIP, MAE and SigLIP; an OpenCLIP / OpenAI CLIP state dict
(`visual.conv1`, `visual.transformer.resblocks.{i}...`, `visual.proj`) and a Hugging Face
transformers one (checkpoints.hf) are renamed to them first. A position table on another grid
is resampled as the checkpoint's own library does (timm: bicubic, antialiased).
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from tps_jax.checkpoints import hf
from tps_jax.checkpoints.assemble import adapt_layout, assemble
from tps_jax.checkpoints.errors import CheckpointMismatchError
from tps_jax.checkpoints.files import load_state_dict, unwrap
from tps_jax.models.vit import VisionTransformer


def _strip_prefix(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
  return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in sd.items()}


_OPENCLIP = (("conv1.", "patch_embed.proj."), ("class_embedding", "cls_token"),
             ("positional_embedding", "pos_embed"), ("ln_pre.", "norm_pre."),
             ("transformer.resblocks.", "blocks."), ("ln_post.", "norm."), (".ln_1.", ".norm1."),
             (".ln_2.", ".norm2."), ("attn.in_proj_", "attn.qkv."), ("attn.out_proj.", "attn.proj."),
             ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))


def from_openclip(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """An OpenCLIP / OpenAI CLIP state dict's image tower (`visual.*`; the text tower's keys
  are left out) in timm's names: the projection `visual.proj` (D, E) becomes a bias-free
  `head` (E outputs)."""
  out = {}
  for name, w in sd.items():
    if not name.startswith("visual."):
      continue
    name = name[len("visual."):]
    if name == "proj":
      out["head.weight"] = np.asarray(w).T
      out["head.bias"] = np.zeros(np.shape(w)[1], np.asarray(w).dtype)
      continue
    for old, new in _OPENCLIP:
      name = name.replace(old, new)
    out[name] = w
  return out


def _dense(out, key, w):
  """A torch Linear's (out, in) weight or its bias into a flax Dense's leaf `key`."""
  out[key] = w.T if w.ndim == 2 else w


def _torch_to_flat(sd: Mapping[str, np.ndarray], model: VisionTransformer) -> dict[str, np.ndarray]:
  """Maps timm-layout names and layouts to our flat "a/b/c" parameter names."""
  d, h = model.width, model.num_heads
  hd = d // h
  out: dict[str, np.ndarray] = {}
  unexpected, misfit = [], []
  leaf = lambda kind: {"weight": "scale", "bias": "bias"}[kind]  # a LayerNorm's
  for name, w in sd.items():
    w = np.asarray(w)
    try:
      if name == "cls_token":
        out["cls"] = w.reshape(1, 1, d)
      elif name == "reg_token":
        out["registers"] = w.reshape(1, -1, d)
      elif m := re.fullmatch(r"(norm_pre|fc_norm)\.(weight|bias)", name):
        out[f"{m.group(1)}/{leaf(m.group(2))}"] = w
      elif m := re.fullmatch(r"attn_pool\.(.+)", name):
        _map_attn_pool(out, m.group(1), w, d, h, hd, name, unexpected)
      elif name == "pos_embed":
        out["pos_embedding"] = w.reshape(1, -1, d)
      elif name == "patch_embed.proj.weight":  # (D, C, p, p) -> (p, p, C, D)
        out["embedding/kernel"] = w.transpose(2, 3, 1, 0)
      elif name == "patch_embed.proj.bias":
        out["embedding/bias"] = w
      elif name in ("norm.weight", "norm.bias"):
        out["Transformer/encoder_norm/" + ("scale" if name.endswith("weight") else "bias")] = w
      elif m := re.fullmatch(r"pre_logits\.fc\.(weight|bias)", name):  # a representation layer
        if not model.rep_size:
          unexpected.append(f"{name} (a pre-logits layer: build the model with rep_size=True)")
          continue
        _dense(out, f"pre_logits/{'kernel' if m.group(1) == 'weight' else 'bias'}", w)
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


def _map_attn_pool(out, rest, w, d, h, hd, name, unexpected):
  """timm's AttentionPoolLatent -> big_vision's MAPHead (`MAPHead_0/...`)."""
  attn = "MAPHead_0/MultiHeadDotProductAttention_0"
  if rest == "latent":
    out["MAPHead_0/probe"] = w.reshape(1, -1, d)
  elif m := re.fullmatch(r"q\.(weight|bias)", rest):
    out[f"{attn}/query/{'kernel' if m.group(1) == 'weight' else 'bias'}"] = (
        w.T.reshape(d, h, hd) if w.ndim == 2 else w.reshape(h, hd))
  elif m := re.fullmatch(r"kv\.(weight|bias)", rest):  # (2D, D) -> key, value
    for part, wi in zip(("key", "value"), np.split(w, 2, axis=0)):
      out[f"{attn}/{part}/{'kernel' if m.group(1) == 'weight' else 'bias'}"] = (
          wi.T.reshape(d, h, hd) if wi.ndim == 2 else wi.reshape(h, hd))
  elif m := re.fullmatch(r"proj\.(weight|bias)", rest):
    out[f"{attn}/out/{'kernel' if m.group(1) == 'weight' else 'bias'}"] = (
        w.T.reshape(h, hd, d) if w.ndim == 2 else w)
  elif m := re.fullmatch(r"norm\.(weight|bias)", rest):
    out[f"MAPHead_0/LayerNorm_0/{'scale' if m.group(1) == 'weight' else 'bias'}"] = w
  elif m := re.fullmatch(r"mlp\.fc([12])\.(weight|bias)", rest):
    _dense(out, f"MAPHead_0/MlpBlock_0/Dense_{int(m.group(1)) - 1}/"
           f"{'kernel' if m.group(2) == 'weight' else 'bias'}", w)
  else:
    unexpected.append(name)


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
    _dense(out, f"{prefix}/MlpBlock_0/Dense_{int(m.group(1)) - 1}/"
           f"{'kernel' if m.group(2) == 'weight' else 'bias'}", w)
  elif m := re.fullmatch(r"ls([12])\.gamma", rest):
    out[f"{prefix}/LayerScale_{int(m.group(1)) - 1}/scale"] = w
  else:
    unexpected.append(name)


def from_torch_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike,
                          model: VisionTransformer, *, fresh: Iterable[str] = (),
                          rng: jax.Array | None = None) -> dict:
  """A timm / DeiT / OpenCLIP / Hugging Face / authors'-TPS state dict -> params for `model`.

  Args:
    state_dict: a mapping of "a.b.c" names to arrays (torch tensors too), or a `.pth`,
      `.npz` or `.safetensors` file of one.
    model: the VisionTransformer to load into, built as the checkpoint's family is
      (docs/model.md): the weights do not tell the GELU ("exact" for timm's ViTs, "quick" for
      OpenAI's CLIP, "tanh" for timm's SigLIP models built with `gelu_tanh`), nor the
      LayerNorm epsilon (1e-5 for CLIP). A position table on another grid is resampled
      (bicubic, antialiased, as timm's loader does).
    fresh: parts to initialise anew ("head", "score_heads").
    rng: the seed of the fresh parts.
  Returns:
    The params tree. Raises CheckpointMismatchError naming missing, unexpected and
    misshapen keys.
  """
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict(state_dict)
  sd = _strip_prefix(unwrap(state_dict), "module.")
  sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in sd.items()}
  if any(k.startswith("visual.trunk.") for k in sd):
    raise CheckpointMismatchError(
        "an OpenCLIP tower built on a timm model (keys visual.trunk.*): load the timm model's "
        "own state dict (those keys without 'visual.trunk.') with its timm name's settings.")
  resample, transformers = "bicubic", hf.is_transformers(sd)
  if any(k.startswith("visual.") for k in sd):
    sd = from_openclip(sd)
  elif transformers:
    resample = hf.resampling(sd)
    sd = hf.to_timm(sd, head="head" not in set(fresh))
  gelu = getattr(model, "gelu", "exact")
  # timm's tanh towers are SigLIP's, without cls (transformers' config says its GELU)
  if gelu == "tanh" and "cls_token" in sd and not transformers:
    raise ValueError("timm's ViTs use the exact (erf) GELU (only some of its SigLIP towers the "
                     "tanh one), but this model has gelu='tanh' (big_vision's default); build "
                     "it with gelu='exact', or from the name with "
                     "tps_jax.models.timm_names.model_kwargs (logits differ by about 6e-4).")
  if gelu == "quick" and "norm_pre.weight" not in sd:
    raise ValueError("gelu='quick' is OpenAI CLIP's, but this state dict has no norm_pre (no "
                     "CLIP tower); build the model from its timm name "
                     "(tps_jax.models.timm_names.model_kwargs).")
  if "patch_embed.proj.weight" in sd and "patch_embed.proj.bias" not in sd:  # CLIP: no bias
    sd["patch_embed.proj.bias"] = np.zeros(sd["patch_embed.proj.weight"].shape[0], np.float32)
  fresh = set(fresh)
  if "head" in fresh:
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
  if "score_heads" in fresh:
    sd = {k: v for k, v in sd.items() if not k.startswith("score_predictor.")}
  flat = _torch_to_flat(sd, model)
  adapt_layout(flat, model, "state dict", resample=resample)
  return assemble(flat, model, fresh=fresh, rng=rng, source="state dict")
