"""timm / DeiT / the authors' TPS PyTorch state dicts -> our parameters."""

from __future__ import annotations

import os
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np

from tps_jax.checkpoints.assemble import adapt_layout, assemble
from tps_jax.checkpoints.errors import CheckpointMismatchError
from tps_jax.checkpoints.files import load_state_dict, unwrap
from tps_jax.models.vit import VisionTransformer


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


def from_torch_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike,
                          model: VisionTransformer, *, fresh: Iterable[str] = (),
                          rng: jax.Array | None = None) -> dict:
  """A timm / DeiT / authors'-TPS state dict -> params for `model`.

  Args:
    state_dict: a mapping of "a.b.c" names to arrays (torch tensors too), or a `.pth`,
      `.npz` or `.safetensors` file of one.
    model: the VisionTransformer to load into (gelu "exact", as timm's).
    fresh: parts to initialise anew ("head", "score_heads").
    rng: the seed of the fresh parts.
  Returns:
    The params tree. Raises CheckpointMismatchError naming missing, unexpected and
    misshapen keys.
  """
  if getattr(model, "gelu", "exact") != "exact":
    raise ValueError(f"timm / DeiT checkpoints use the exact (erf) GELU, but this model has "
                     f"gelu={model.gelu!r}; build it with gelu='exact' (their logits differ by "
                     f"about 6e-4 otherwise).")
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = load_state_dict(state_dict)
  sd = _strip_prefix(unwrap(state_dict), "module.")
  sd = {k: (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
        for k, v in sd.items()}
  fresh = set(fresh)
  if "head" in fresh:
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
  if "score_heads" in fresh:
    sd = {k: v for k, v in sd.items() if not k.startswith("score_predictor.")}
  flat = _torch_to_flat(sd, model)
  adapt_layout(flat, model, "state dict")
  return assemble(flat, model, fresh=fresh, rng=rng, source="state dict")
