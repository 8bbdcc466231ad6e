"""The `Model` settings of a timm (or OpenCLIP) ViT, from its timm model name.

  kw = timm_names.model_kwargs("vit_small_patch14_reg4_dinov2.lvd142m", image_size=224)
  model = Model(0, **kw, reduction="tome")   # then checkpoints.load_params(file, model)

A checkpoint's tensors do not say everything a model needs: the GELU, the LayerNorm epsilon,
where the position table starts, how the tokens are pooled. timm says it in the model's
name; this module reads the families docs/model.md lists (each checked against timm's own
forward by tests/test_timm_families.py):

  deit_* / vit_*_patch*_{224,384} timm's ViT and DeiT: cls with a position, exact GELU
  deit3_*                         DeiT III: layer scale, position table on the patches only
  vit_*_patch14_dinov2            DINOv2: layer scale, patch 14 (518 px checkpoints); giant:
                                  width 1536, 24 heads, packed SwiGLU MLP (mlp_dim 8192)
  vit_*_patch14_reg4_dinov2       DINOv2 with 4 registers, position table on the patches only
  vit_*_clip_*                    CLIP / OpenCLIP: norm_pre, LayerNorm eps 1e-5; "quickgelu"
                                  in the name (OpenAI's weights): quick GELU
  vit_*_patch16_224.mae           MAE: timm's ViT (its pretrained weights: cls and norm);
                                  global_pool="avg" builds its fine-tuning form: GAP over the
                                  patches (cls kept but not read) with fc_norm
  vit_*_siglip_*                  SigLIP: MAP head, no cls (its GELU as timm builds it)
  vit_*_siglip_gap_*              SigLIP's GAP form: the mean of the normalised tokens, no cls
"""

from __future__ import annotations

import re
from typing import Any

# timm's size words -> our variants (models/vit.py's table; timm's giant is g, 1408 wide, as
# its CLIP giant; DINOv2's giant is g-opt's width and depth with its own heads and MLP).
_SIZES = {"tiny": "Ti", "small": "S", "medium": "M", "base": "B", "large": "L", "huge": "H",
          "so400m": "So400m", "giant": "g"}
# timm's SigLIP models built with `act_layer='gelu_tanh'`, MAP and GAP alike (timm 1.0.15; the
# rest use the exact GELU).
_SIGLIP_TANH = re.compile(r"vit_(base_patch32_siglip(_gap)?_256|large_patch16_siglip(_gap)?_512|"
                          r"so400m_patch16_siglip(_gap)?_\d+)")


def model_kwargs(name: str, *, global_pool: str | None = None,
                 **overrides: Any) -> dict[str, Any]:
  """`Model`'s keyword arguments (variant, patch and image size, layout, pooling, GELU, ...)
  for timm model `name` (a pretrained tag after "." is allowed).

  `global_pool` is timm's argument of that name: "avg" pools the patch tokens (the cls token
  kept but not read) and normalises the pooled vector (timm's fc_norm), as MAE fine-tunes;
  "token" reads cls. `overrides` (image_size, reduction, dtype, ...) replace the rest.
  Raises ValueError naming a family or pooling it does not read."""
  base, _, _ = name.partition(".")
  m = re.fullmatch(r"(deit3|vit|deit)_(\w+?)_patch(\d+)(?:_([a-z]\w*?))?(?:_(\d+))?", base)
  if not m or m.group(2) not in _SIZES:
    raise ValueError(f"unknown timm ViT name {name!r}; the families read are deit_*, deit3_*, "
                     f"vit_*_patchP_S, *_dinov2, *_clip_*, *.mae and *_siglip_* "
                     f"(docs/model.md), sized {sorted(_SIZES)}.")
  kind, size, patch, rest, pixels = m.groups()
  rest = rest or ""
  kw: dict[str, Any] = dict(variant=f"{_SIZES[size]}/{patch}", layout="deit", gelu="exact",
                            pool_type="tok", layer_norm_eps=1e-6,
                            image_size=int(pixels) if pixels else 224)
  if kind == "deit3":
    kw.update(layout="big_vision", layer_scale=1e-6)
  elif "dinov2" in rest:
    kw.update(layer_scale=1e-5, image_size=518)
    if size == "giant":  # timm: mlp_ratio 2.66667 * 2, SwiGLUPacked (fc1 (1536, 8192))
      kw.update(variant=f"g-opt/{patch}", num_heads=24, mlp_dim=8192, mlp="swiglu")
    if rest.startswith("reg"):
      kw.update(num_registers=int(re.match(r"reg(\d+)", rest).group(1)), layout="big_vision")
  elif "clip" in rest:
    kw.update(norm_pre=True, layer_norm_eps=1e-5, gelu="quick" if "quickgelu" in rest
              else "exact")
  elif "siglip" in rest:
    kw.update(pool_type="gap" if "siglip_gap" in rest else "map", layout="big_vision",
              gelu="tanh" if _SIGLIP_TANH.fullmatch(base) else "exact")
  elif rest:
    raise ValueError(f"unknown timm ViT family {rest!r} in {name!r}; see docs/model.md.")
  if global_pool == "avg":
    kw.update(pool_type="gap", class_token=kw["pool_type"] == "tok", fc_norm=True)
  else:
    own = {"tok": "token", "map": "map", "gap": "avg"}[kw["pool_type"]]
    if global_pool not in (None, own):
      raise ValueError(f"global_pool {global_pool!r} is not read for {name!r}; expected "
                       f"'avg' or its own pooling, {own!r}.")
  kw.update(overrides)
  return kw
