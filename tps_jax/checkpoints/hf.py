"""Hugging Face transformers' ViT state dicts in timm's names.

transformers' CLIP (`CLIPVisionModel[WithProjection]`, `CLIPModel`), SigLIP
(`SiglipVisionModel`, `SiglipModel`), DINOv2 (`Dinov2Model`, with registers
`Dinov2WithRegistersModel`) and Google's ViT (`ViTModel`, `ViTForImageClassification`) name
their tensors their own way, in two generations: the Hub's files (`attention.attention.query`,
`intermediate.dense`, DINOv2's packed `mlp.weights_in`) and transformers 5's modules
(`attention.q_proj`, `mlp.fc1`, `mlp.gate_proj` / `up_proj`). Both are renamed here to the
names `checkpoints.timm` reads; the separate q / k / v projections become one `attn.qkv`.
A vision-language model's image tower (LLaVA's CLIP, PaliGemma's SigLIP: `vision_model.`
below the top level) is taken from its state dict, the language model left out.
Text-tower keys (`text_model.*`, `text_projection`, `logit_scale`, `logit_bias`) are left
out. The settings the tensors do not carry (GELU, epsilon, pooling) come from the model's
`config.json`: `tps_jax.models.hf_config.model_kwargs`.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from tps_jax.checkpoints.errors import CheckpointMismatchError

# Prefixes of the towers inside a model with a head or a text tower.
_TOWERS = ("vision_model.", "vit.", "dinov2.")
_LEFT_OUT = re.compile(r"(text_model\.|text_projection\.|logit_scale$|logit_bias$|"
                       r"embeddings\.mask_token$|embeddings\.position_ids$)")
_TOP = {
    "embeddings.class_embedding": "cls_token", "embeddings.cls_token": "cls_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embedding.weight": "pos_embed",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "head.probe": "attn_pool.latent",
    "visual_projection.weight": "head.weight", "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_TOP_PREFIX = (("pre_layrnorm.", "norm_pre."), ("post_layernorm.", "norm."),
               ("layernorm.", "norm."),
               ("head.attention.out_proj.", "attn_pool.proj."),
               ("head.layernorm.", "attn_pool.norm."), ("head.mlp.", "attn_pool.mlp."),
               ("pooler.dense.", "pre_logits.fc."))
# Inside a block, first match wins (attention.output.dense before output.dense).
_BLOCK = (
    (r"(layer_norm1|norm1|layernorm_before)\.", "norm1."),
    (r"(layer_norm2|norm2|layernorm_after)\.", "norm2."),
    (r"(self_attn|attention)\.(q_proj|attention\.query)\.", "q."),
    (r"(self_attn|attention)\.(k_proj|attention\.key)\.", "k."),
    (r"(self_attn|attention)\.(v_proj|attention\.value)\.", "v."),
    (r"(self_attn\.out_proj|attention\.o_proj|attention\.output\.dense)\.", "attn.proj."),
    (r"(mlp\.fc1|intermediate\.dense|mlp\.weights_in)\.", "mlp.fc1."),
    (r"(mlp\.fc2|output\.dense|mlp\.weights_out|mlp\.down_proj)\.", "mlp.fc2."),
    (r"mlp\.gate_proj\.", "gate."), (r"mlp\.up_proj\.", "up."),
    (r"layer_scale1\.lambda1", "ls1.gamma"), (r"layer_scale2\.lambda1", "ls2.gamma"),
)
_BLOCK_KEY = re.compile(r"(?:encoder\.layers?|layers)\.(\d+)\.(.+)")
# Separate tensors that timm keeps as one, in its order: the attention's q, k, v, and
# transformers 5's SwiGLU halves (silu(gate) * up, packed as timm's fc1).
_FUSED = {"attn.qkv": ("attention", ("q", "k", "v")), "mlp.fc1": ("SwiGLU", ("gate", "up"))}
_PART = {part: fused for fused, (_, parts) in _FUSED.items() for part in parts}


def is_transformers(sd: Mapping[str, object]) -> bool:
  """Whether a state dict is in transformers' names (its patch embedding's)."""
  return any(re.search(r"(^|\.)embeddings\.patch_embeddings?\.", k) for k in sd)


def resampling(sd: Mapping[str, object]) -> str:
  """How transformers interpolates this model's position table on another grid: DINOv2 with
  registers antialiased, the others plain bicubic (posemb.RESAMPLINGS)."""
  return "bicubic" if any(k.endswith("embeddings.register_tokens") for k in sd) \
      else "bicubic_no_antialias"


def vision_tower(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A vision-language model's image tower (LLaVA's `model.vision_tower.vision_model.*`,
  PaliGemma's, ...: a `vision_model.` below the top level) as a vision model's state dict; the
  language model and projector left out. Any other state dict is returned as it is."""
  if not any(".vision_model." in k for k in sd):
    return dict(sd)
  return {k.rsplit("vision_model.", 1)[1]: v for k, v in sd.items() if ".vision_model." in k}


def _strip_tower(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    for prefix in _TOWERS:
      if k.startswith(prefix):
        k = k[len(prefix):]
        break
    out[k] = v
  return out


def to_timm(sd: Mapping[str, np.ndarray], *, head: bool = True) -> dict[str, np.ndarray]:
  """A transformers state dict (numpy arrays) in timm's names; keys it does not know keep
  their names (the loader then names them as unexpected). `head=False` leaves the classifier
  or projection out (it is initialised anew)."""
  sd = vision_tower(sd)
  if not head:
    sd = {k: v for k, v in sd.items() if not k.startswith(("classifier.", "visual_projection."))}
  if "classifier.weight" in sd and not any(k.startswith("vit.") for k in sd):
    # DINOv2's classifier reads cls and the patch mean (2 x width inputs), CLIP's and SigLIP's
    # the mean of the tokens before the final norm: heads this model does not have
    raise CheckpointMismatchError(
        "a Dinov2 / CLIP / Siglip ForImageClassification head pools the tokens otherwise than "
        "this model's head; load the backbone without it: fresh=('head',) "
        "(checkpoints.load_params / from_torch_state_dict), or from_pretrained(..., "
        "num_classes=0 or a new count).")
  sd = _strip_tower(sd)
  out, parts = {}, {}  # parts: (block, fused name, weight / bias) -> {part: tensor}
  for key, w in sd.items():
    if _LEFT_OUT.match(key):
      continue
    if key in _TOP:
      out[_TOP[key]] = w
      continue
    if m := re.fullmatch(r"head\.attention\.in_proj_(weight|bias)", key):  # q, then k and v
      q, kv = np.split(np.asarray(w), [np.shape(w)[0] // 3])
      out[f"attn_pool.q.{m.group(1)}"], out[f"attn_pool.kv.{m.group(1)}"] = q, kv
      continue
    prefix = next(((old, new) for old, new in _TOP_PREFIX if key.startswith(old)), None)
    if prefix:
      out[prefix[1] + key[len(prefix[0]):]] = w
      continue
    m = _BLOCK_KEY.fullmatch(key)
    if not m:
      out[key] = w
      continue
    i, rest = m.groups()
    name = next((re.sub("^" + pat, new, rest) for pat, new in _BLOCK if re.match(pat, rest)),
                None)
    if name is None:
      out[key] = w
      continue
    part, kind = name.split(".", 1)
    if part in _PART:
      parts.setdefault((i, _PART[part], kind), {})[part] = w
    else:
      out[f"blocks.{i}.{name}"] = w
  for (i, fused, kind), got in parts.items():
    label, order = _FUSED[fused]
    missing = [p for p in order if p not in got]
    if missing:
      raise CheckpointMismatchError(f"block {i}'s {label} {kind} lacks {missing} in the "
                                    "state dict.")
    out[f"blocks.{i}.{fused}.{kind}"] = np.concatenate([got[p] for p in order], axis=0)
  if "head.weight" in out and "head.bias" not in out:  # CLIP's projection: no bias
    out["head.bias"] = np.zeros(np.shape(out["head.weight"])[0], np.float32)
  if "cls_token" in out:
    out["cls_token"] = np.asarray(out["cls_token"]).reshape(1, 1, -1)
  if "reg_token" in out and "pos_embed" in out:
    # transformers adds positions to cls and the patches, then inserts the registers: cls's
    # row folds into cls (exact), and the table holds the patches only (timm's layout)
    pos = np.asarray(out["pos_embed"]).reshape(1, -1, np.shape(out["pos_embed"])[-1])
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
  return out
