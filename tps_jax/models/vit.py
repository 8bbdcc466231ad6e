"""Vision Transformer (ViT / DeiT) with token-reduction stages.

big_vision's interface and parameter names:

  model = Model(num_classes, variant="S/16", reduction=dict(method="dtps", keep_ratio=0.7))
  logits, out = model.apply({"params": params}, images_nhwc, train=False)

Parameters: `embedding` (patch projection, nn.Conv's kernel), `cls`, `pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `head`, and for
learned methods `Transformer/score_head_{s}` (leave them out to load a dense
checkpoint).

`layout="deit"`: cls has a position embedding (pos_embedding has N0 + 1 rows).
`layout="big_vision"`: position embedding on patches only (N0 rows), then cls.

Training vs inference: with `train=True`, dtps / dynamicvit keep all N0 tokens
and mark decisions with straight-through Gumbel samples (rng stream "gumbel";
`gumbel_noise=False` turns the noise off), attention masking dropped tokens by
policy. Every other path, and every method at `train=False`, gathers the kept
tokens so the blocks after a stage run on fewer tokens.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tps_jax import ops
from tps_jax.models import stages
from tps_jax.models.layers import IMPLEMENTATIONS, REMAT_METHODS, Encoder1DBlock, PatchEmbedding
from tps_jax.models.reduction import Reduction
from tps_jax.models.score_head import ScoreHead

VARIANTS = {
    "Ti": dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    "S": dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    "M": dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    "B": dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    "L": dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
}
LAYOUTS = ("deit", "big_vision")


def decode_variant(variant: str | None) -> dict[str, Any]:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16)."""
  if variant is None:
    return {}
  m = re.fullmatch(r"(\w+)/(\d+)", variant)
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; expected NAME/PATCH with NAME in "
                     f"{sorted(VARIANTS)}, e.g. 'S/16'.")
  return {**VARIANTS[m.group(1)], "patch_size": int(m.group(2))}


class Encoder(nn.Module):
  """The block stack with reduction stages; named "Transformer" in the model.

  __call__(x (B, 1 + N0, D), train) -> (tokens (B, 1 + N', D), out dict).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  reduction: Reduction
  num_patches: int
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  gumbel_noise: bool = True
  attention: str = "auto"
  policy_form: str = "exact"
  drop_path: float = 0.0
  remat: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    red = self.reduction
    b = x.shape[0]
    n0 = self.num_patches
    masked = train and red.learned  # fixed-shape decisions with policy attention
    positions = jnp.broadcast_to(jnp.arange(n0, dtype=jnp.int32), (b, n0))
    live = jnp.ones((b, n0), jnp.float32)
    size = None  # ToMe token sizes
    decisions, hosts, keep_positions = [], [], []
    stage_at = red.stage_at

    # remat: every block is rematerialised whichever way it runs (whole, or in halves around
    # an intra-block stage), and so is each stage's own work (score head, squeeze / fuse /
    # merge), which holds (B, N, N') similarity and one-hot matrices.
    if self.remat:
      block_cls = nn.remat(Encoder1DBlock, methods=REMAT_METHODS)
      head_cls = nn.remat(ScoreHead)
      stage_fn = jax.checkpoint
    else:
      block_cls, head_cls, stage_fn = Encoder1DBlock, ScoreHead, lambda f: f
    for i in range(self.depth):
      rate = self.drop_path * i / max(self.depth - 1, 1)  # linear in depth, as DeiT
      block = block_cls(self.mlp_dim, self.num_heads, dtype=self.dtype,
                        layer_norm_eps=self.layer_norm_eps, attention=self.attention,
                        policy_form=self.policy_form, drop_path=rate,
                        deterministic=not train, name=f"encoderblock_{i}")
      s = stage_at.get(i)

      if s is not None and red.learned:  # between blocks, before block i
        head = head_cls(dtype=self.dtype, name=f"score_head_{s}")
        if masked:
          logits = head(x[:, 1:], live)
          rng = self.make_rng("gumbel") if self.gumbel_noise else None
          keep = ops.gumbel_softmax_hard(logits, rng)[..., 0] * live
          x, host = stage_fn(functools.partial(
              stages.decide_masked, squeeze=red.squeezes, temperature=red.temperature))(
                  x, keep, live)
          live = keep
          decisions.append(keep); hosts.append(host)
        else:
          logits = head(x[:, 1:], jnp.ones(x.shape[:2], jnp.float32)[:, 1:])
          st = stage_fn(functools.partial(
              stages.prune_by_scores, k=red.keep_counts[s], num_patches=n0,
              method="squeeze" if red.squeezes else "drop", temperature=red.temperature))(
                  x, logits[..., 0], positions)
          x, positions = st.x, st.positions
          decisions.append(st.decision); hosts.append(st.hosts); keep_positions.append(positions)

      if s is not None and red.intra_block:  # inside block i
        y, info = block.attend(x)
        scores = jnp.mean(info.cls_attn[:, :, 1:], axis=1)  # (B, N)
        method = {"etps": "squeeze", "evit": "fuse", "topk": "drop"}[red.method]
        st = stage_fn(functools.partial(
            stages.prune_by_scores, k=red.keep_counts[s], method=method, num_patches=n0,
            temperature=red.temperature))(y, scores, positions)
        x, positions = block.feed(st.x), st.positions
        decisions.append(st.decision); hosts.append(st.hosts); keep_positions.append(positions)
      elif red.tome_r and red.tome_r[i]:
        bias = ops.proportional_attention_bias(size) if size is not None else None
        y, info = block.attend(x, bias=bias)
        merge = lambda y, size, keys, r=red.tome_r[i]: ops.merge_wavg(
            y, size, ops.bipartite_soft_matching(keys, r))
        y, size = stage_fn(merge)(y, size, info.keys)
        x = block.feed(y)
      else:
        policy = jnp.pad(live, ((0, 0), (1, 0)), constant_values=1.0) if masked else None
        x = block(x, policy=policy)

    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")(x)
    out = {
        "decisions": decisions,  # per stage (B, N0): 1 where the patch is still kept
        "hosts": hosts,  # per stage (B, N0): host patch of each patch pruned there, else -1
        "keep_indices": keep_positions,  # per stage (B, k_s) original patch positions (gather path)
        # (B, 1 + N'): live tokens of the final sequence (all ones on the gather path).
        "live_mask": (jnp.pad(live, ((0, 0), (1, 0)), constant_values=1.0) if masked
                      else jnp.ones(x.shape[:2], jnp.float32)),
    }
    if size is not None:
      out["token_sizes"] = size
    return x, out


class VisionTransformer(nn.Module):
  """ViT / DeiT classifier. Build it with `Model(...)`, which validates the config."""
  num_classes: int | None
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  image_size: int
  reduction: Reduction
  layout: str = "deit"
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  gumbel_noise: bool = True
  attention: str = "auto"  # layers.IMPLEMENTATIONS; see layers.MultiHeadDotProductAttention
  # dTPS / DynamicViT training attention: "exact" | "deferred" | "fused" | "log_bias";
  # see ops.POLICY_FORMS
  policy_form: str = "exact"
  drop_path: float = 0.0  # stochastic depth of the last block (linear from 0), train only
  remat: bool = False  # rematerialise the blocks (nn.remat) to save activation memory
  channels: int = 3  # input image channels

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    """image (B, H, W, C) NHWC -> (logits (B, num_classes), out dict)."""
    want = (self.image_size, self.image_size, self.channels)
    if image.ndim != 4 or image.shape[1:] != want:
      raise ValueError(f"image must be (B, {', '.join(map(str, want))}) NHWC for this model, "
                       f"got shape {image.shape}.")
    out = {}
    p = self.patch_size
    x = PatchEmbedding(self.width, p, dtype=self.dtype, name="embedding")(image)  # (B, N0, D)
    b = x.shape[0]
    n0 = x.shape[1]
    init = nn.initializers.normal(stddev=0.02)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.width))
    cls = jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype)
    if self.layout == "deit":
      pos = self.param("pos_embedding", init, (1, n0 + 1, self.width))
      x = jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)
    else:
      pos = self.param("pos_embedding", init, (1, n0, self.width))
      x = jnp.concatenate([cls, x + pos.astype(x.dtype)], axis=1)

    x, enc_out = Encoder(self.depth, self.mlp_dim, self.num_heads, self.reduction, n0,
                         dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
                         gumbel_noise=self.gumbel_noise, attention=self.attention,
                         policy_form=self.policy_form, drop_path=self.drop_path,
                         remat=self.remat, name="Transformer")(x, train=train)
    out.update(enc_out)
    out["encoded"] = x
    out["pre_logits"] = x[:, 0]
    if self.num_classes:
      logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x[:, 0])
      out["logits"] = logits
    else:
      logits = x[:, 0]
    return logits, out


def Model(num_classes: int | None = None, *, variant: str | None = None,  # noqa: N802
          reduction: Any = None, image_size: int = 224, layout: str = "deit",
          **kw) -> VisionTransformer:
  """Builds a ViT; `variant` ("Ti/16", "S/16", "B/16", "L/16", ...) fills the sizes.

  Any of width, depth, mlp_dim, num_heads, patch_size given in `kw` overrides the
  variant. `reduction` is a Reduction, a method name or a dict (see
  `tps_jax.models.reduction`). Raises ValueError on a config that cannot work.
  """
  cfg = {**decode_variant(variant), **kw}
  missing = [k for k in ("width", "depth", "num_heads", "patch_size") if k not in cfg]
  if missing:
    raise ValueError(f"Model needs {missing} (or a variant such as 'S/16').")
  cfg.setdefault("mlp_dim", 4 * cfg["width"])
  if kw.get("policy_form", "exact") not in ops.POLICY_FORMS:
    raise ValueError(f"unknown policy_form {kw['policy_form']!r}; expected one of "
                     f"{ops.POLICY_FORMS}.")
  if kw.get("attention", "auto") not in IMPLEMENTATIONS:
    raise ValueError(f"unknown attention {kw['attention']!r}; expected one of "
                     f"{IMPLEMENTATIONS}.")
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}.")
  if image_size % cfg["patch_size"]:
    raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                     f"{cfg['patch_size']}.")
  if cfg["width"] % cfg["num_heads"]:
    raise ValueError(f"width {cfg['width']} is not divisible by num_heads {cfg['num_heads']}.")
  num_patches = (image_size // cfg["patch_size"]) ** 2
  reduction = Reduction.create(reduction, depth=cfg["depth"], num_patches=num_patches)
  return VisionTransformer(num_classes=num_classes, image_size=image_size, layout=layout,
                           reduction=reduction, **cfg)


def build_model(model_cfg, num_classes: int | None, *, mixed_precision: bool = False,
                **overrides) -> VisionTransformer:
  """`Model` from a config's model section (a ConfigDict or mapping, as configs/ build it).

  `mixed_precision`: bfloat16 compute with float32 parameters. `overrides` replace
  config entries (e.g. `reduction=None` for the dense model of a config).
  """
  cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg or {})
  kw = {k: tuple(v) if isinstance(v, list) else v for k, v in {**cfg, **overrides}.items()}
  if mixed_precision:
    kw["dtype"] = jnp.bfloat16
  return Model(num_classes, **kw)
