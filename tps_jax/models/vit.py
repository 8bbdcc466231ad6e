"""Vision Transformer (ViT / DeiT / big_vision ViT) with token-reduction stages.

big_vision's interface and parameter names:

  model = Model(num_classes, variant="S/16", reduction=dict(method="dtps", keep_ratio=0.7))
  logits, out = model.apply({"params": params}, images_nhwc, train=False)

Parameters: `embedding` (patch projection, nn.Conv's kernel), `cls` (pool_type "tok"),
`pos_embedding` (posemb "learn"), `Transformer/encoderblock_{i}/...` (or, with `scan`, one
`Transformer/encoderblock/...` stacked over depth), `Transformer/encoder_norm`,
`MAPHead_0/...` (pool_type "map"), `pre_logits` (rep_size), `head`, and for learned methods
`Transformer/score_head_{s}` (leave them out to load a dense checkpoint).

One model runs DeiT / timm, big_vision / AugReg / SigLIP checkpoints alike:
- `pool_type`: "tok" (a cls token; the DeiT default), "gap" (mean of the tokens), "map"
  (attention pooling), "0" (token 0, a patch), "none" (every token). After a reduction GAP
  and MAP weigh each token by the patches it stands for (pooling.py).
- `layout`: "deit" (the tokens before the patches, cls and registers, have position
  embeddings: N0 + 1 + R rows) or "big_vision" (position embedding on the patches only, then
  cls and registers lead).
- `posemb`: "learn" or "sincos2d"; `gelu`: "exact" (DeiT, timm), "tanh" (big_vision) or
  "quick" (OpenAI's CLIP).
- timm's and OpenCLIP's ViTs (docs/model.md lists them): `class_token` (a cls token whatever
  the pooling: MAE pools the patches of a model with one), `num_registers` (DINOv2's register
  tokens, `registers`, after cls), `layer_scale` (`LayerScale_{0,1}/scale` in each block),
  `norm_pre` (CLIP's LayerNorm before the blocks), `fc_norm` (the final LayerNorm on the
  pooled vector instead of the tokens), `mlp` ("swiglu": DINOv2 giant's packed SwiGLU).
- `scan`: blocks stacked and run by `lax.scan`, each run of blocks between two stages as
  one scan over its slice of the stack (big_vision's layout and rematerialisation).

Tokens a stage may reduce: every patch token, except token 0 of a pool-"0" model, which
is its readout and is kept, like cls and registers (`num_prefix` protected tokens lead the
sequence: cls, registers; GAP pools the patch tokens only, as timm does).

Training vs inference: with `train=True`, learned methods (dtps, dynamicvit) keep all tokens
and mark decisions with straight-through Gumbel samples (rng stream "gumbel";
`gumbel_noise=False` turns the noise off), attention masking dropped tokens by
policy. Every other path, and every method at `train=False`, gathers the kept
tokens so the blocks after a stage run on fewer tokens.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods import (Block, Context, Dims, Reduction, TokenState, declares,
                             freeze)
from tps_jax.models import logical, pooling, posemb
from tps_jax.models.layers import (BLOCK_FUNCTIONS, GELUS, IMPLEMENTATIONS, MLPS,
                                   Encoder1DBlock, PatchEmbedding)

# Width, depth, MLP width and heads by name: big_vision's table (Zhai et al. 2021, Table 2;
# SigLIP's So400m), which holds DeiT's Ti / S / B.
_SIZES = {
    "mu": (32, 1, 128, 2), "Ti": (192, 12, 768, 3), "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16), "H": (1280, 32, 5120, 16), "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16), "G": (1664, 48, 8192, 16), "G-opt": (1536, 48, 8192, 16),
    "e": (1792, 56, 15360, 16),
}
VARIANTS = {k: dict(width=w, depth=d, mlp_dim=m, num_heads=h)
            for k, (w, d, m, h) in _SIZES.items()}
LAYOUTS = ("deit", "big_vision")
POOL_TYPES = pooling.POOL_TYPES
POSEMBS = posemb.POSEMBS


def decode_variant(variant: str | None) -> dict[str, Any]:
  """"S/16" -> dict(width=384, depth=12, mlp_dim=1536, num_heads=6, patch_size=16); "S"
  alone gives the sizes without a patch size."""
  if variant is None:
    return {}
  m = re.fullmatch(r"([\w-]+?)(?:/(\d+))?", variant)
  if not m or m.group(1) not in VARIANTS:
    raise ValueError(f"unknown ViT variant {variant!r}; expected NAME or NAME/PATCH with NAME "
                     f"in {sorted(VARIANTS)}, e.g. 'S/16'.")
  out = dict(VARIANTS[m.group(1)])
  if m.group(2):
    out["patch_size"] = int(m.group(2))
  return out


def _pair(v) -> tuple[int, int]:
  return (int(v), int(v)) if isinstance(v, (int, float)) else tuple(int(a) for a in v)


def resolve_reduction(spec, *, depth: int, num_patches: int, prefix: int,
                      has_cls: bool, has_probe: bool = False) -> Reduction:
  """A Reduction for `num_patches` reducible tokens from a Reduction, a (frozen) spec, a
  method name or None."""
  if isinstance(spec, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in spec):
    spec = dict(spec)
  return Reduction.create(spec, depth=depth, num_patches=num_patches, prefix=prefix,
                          has_cls=has_cls, has_probe=has_probe)


_TOKEN_RECORDS: list[list] = []  # where a trace for `traced_plan` records


@functools.lru_cache(maxsize=256)
def traced_plan(model: "VisionTransformer") -> tuple[tuple, tuple[int, ...]]:
  """What `model`'s method does at inference, read from one abstract trace (no compile, no
  FLOPs): per block the tokens (the prefix included) its attention runs on, its MLP runs on,
  and it leaves; and the blocks whose stages record decisions (`out["decisions"]`)."""
  (h, w), c = _pair(model.image_size), model.channels
  image = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
  record: list = []
  _TOKEN_RECORDS.append(record)
  try:
    jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0), x, train=False), image)
  finally:
    _TOKEN_RECORDS.pop()
  tokens, stage_at = record
  return tuple(tuple(int(n) for n in t) for t in tokens), tuple(stage_at)


class Encoder(nn.Module):
  """The block stack; named "Transformer" in the model. It runs the blocks and hands each block
  its reduction method acts at to the method (`tps_jax.methods.Method.block`), which knows
  everything of its own; the encoder only carries the token state between blocks.

  __call__(x (B, P + N0', D), train) -> (tokens (B, P + N', D), out dict), P = `prefix`.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  reduction: Reduction
  num_patches: int  # N0: patches of the image
  dtype: Any = jnp.float32
  layer_norm_eps: float = 1e-6
  gumbel_noise: bool = True
  attention: str = "auto"
  policy_form: str = "exact"
  drop_path: float = 0.0
  remat: bool = False
  prefix: int = 1  # protected tokens leading the sequence (cls, registers, pool "0"'s token 0)
  has_cls: bool = True  # token 0 is a cls token (no patch)
  registers: int = 0  # register tokens after cls (no patch)
  layer_scale: float | None = None  # Encoder1DBlock.layer_scale
  mlp: str = "gelu"  # layers.MLPS
  final_norm: bool = True  # `encoder_norm` on the output tokens (off where timm's fc_norm is)
  gelu: str = "exact"
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "nothing_saveable"
  track_sizes: bool = False  # weigh pooling: patches each token stands for
  track_owner: bool = False  # follow each patch to its final token (2-D outputs)
  ordered: bool = False  # the tokens are the output (pool "none"): stages keep their order

  def _blocks(self, x, train: bool):
    """(apply(i, function, *args), run(a, e, x, policy, bias)): one of block i's functions
    (layers.BLOCK_FUNCTIONS), and blocks a..e-1 whole (a python loop, or with `scan` one
    `lax.scan` over their slice of the stack)."""
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dtype=self.dtype,
              layer_norm_eps=self.layer_norm_eps, implementation=self.attention,
              policy_form=self.policy_form, gelu=self.gelu, dropout=self.dropout,
              layer_scale=self.layer_scale, mlp=self.mlp)
    rates = [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]
    if not self.scan:
      block_cls = nn.remat(Encoder1DBlock, methods=BLOCK_FUNCTIONS) if self.remat \
          else Encoder1DBlock
      blocks = [block_cls(**kw, drop_path=rates[i], deterministic=not train,
                          name=f"encoderblock_{i}") for i in range(self.depth)]

      def apply(i, function, *args, **kwargs):
        return getattr(blocks[i], function)(*args, **kwargs)

      def run(a, e, x, policy, bias):
        for i in range(a, e):
          x = logical.constrain(blocks[i](x, policy=policy, bias=bias))
        return x
      return apply, run

    template = Encoder1DBlock(**kw, parent=None)
    dummy_shape = (1,) + x.shape[1:]

    def init_stack(rng):  # big_vision's stacked layout: every leaf gains a leading depth axis
      dummy = jnp.zeros(dummy_shape, jnp.float32)
      return jax.vmap(lambda r: template.init(r, dummy)["params"])(
          jax.random.split(rng, self.depth))

    stack = self.param("encoderblock", init_stack)
    needs_rng = train and (self.dropout > 0 or self.drop_path > 0)
    rng = self.make_rng("dropout") if needs_rng else None
    rngs_for = lambda i: {"dropout": jax.random.fold_in(rng, i)} if rng is not None else {}
    block = Encoder1DBlock(**kw, deterministic=not train, parent=None)

    def apply(i, function, *args, **kwargs):
      if function == "__call__":  # a whole block: one step of the scan, rematerialised
        return run(i, i + 1, *args, kwargs.get("policy"), kwargs.get("bias"))
      params = jax.tree.map(lambda t: t[i], stack)
      one = Encoder1DBlock(**kw, drop_path=rates[i], deterministic=not train, parent=None)
      return one.apply({"params": params}, *args, method=function, rngs=rngs_for(i), **kwargs)

    policy_fn = getattr(jax.checkpoint_policies, self.remat_policy, None)

    def run(a, e, x, policy, bias):
      def body(x, inp):
        params, i, rate = inp
        y = block.apply({"params": params}, x, policy, rate if self.drop_path else None, bias,
                        rngs=rngs_for(i))
        return logical.constrain(y), None
      body = jax.checkpoint(body, policy=policy_fn, prevent_cse=False)
      xs = (jax.tree.map(lambda t: t[a:e], stack), jnp.arange(a, e),
            jnp.asarray(rates[a:e], jnp.float32))
      return jax.lax.scan(body, x, xs)[0]
    return apply, run

  @property
  def first(self) -> int:
    """Patch position of the first reducible token (1 where patch 0 is pool "0"'s readout)."""
    return self.prefix - int(self.has_cls) - self.registers

  def _context(self, train: bool, probe) -> Context:
    red = self.reduction
    if self.remat and not self.scan:  # scan always rematerialises (with remat_policy)
      checkpoint, wrap = jax.checkpoint, nn.remat
    else:
      checkpoint, wrap = (lambda f: f), (lambda cls: cls)
    return Context(prefix=self.prefix, first=self.first,
                   num_patches=self.num_patches, has_cls=self.has_cls, train=train,
                   masked=train and red.learned, dtype=self.dtype,
                   gumbel_noise=self.gumbel_noise, checkpoint=checkpoint,
                   module=lambda cls, **kw: wrap(cls)(**kw), make_rng=self.make_rng,
                   ordered=self.ordered, probe=probe)

  @nn.compact
  def __call__(self, x, *, train: bool = False, probe=None):
    """x (B, P + N0', D); probe: the MAP head's probe query (H, D/H) where the method uses
    it (`Context.probe`), else None."""
    red, ctx = self.reduction, self._context(train, probe)
    method, opts = red.impl, red.options
    b, n0 = x.shape[0], self.num_patches
    reducible = n0 - ctx.first
    state = TokenState(
        x=x, positions=jnp.broadcast_to(jnp.arange(ctx.first, n0, dtype=jnp.int32),
                                        (b, reducible)),
        size=(jnp.ones(x.shape[:2], jnp.float32)
              if self.track_sizes or method.tracks_sizes else None),
        live=jnp.ones((b, reducible), jnp.float32) if ctx.masked else None,
        owner=(jnp.broadcast_to(jnp.arange(n0, dtype=jnp.int32) + self.prefix - ctx.first,
                                (b, n0))
               if self.track_owner else None))
    # What the method declares, the encoder holds it to; what it does not, the shapes tell.
    tokens = red.tokens() if red.declares_tokens else None
    seen, stage_at = [], []  # per block: (attention, MLP, left) tokens; blocks with a stage
    apply, run = self._blocks(x, train)
    i = 0
    while i < self.depth:
      if method.acts_at(opts, i):
        block, n, stages_before = Block(apply, i), state.x.shape[1], len(state.decisions)
        state, i = method.block(opts, i, block, state, ctx), i + 1
        left = state.x.shape[1]
        attn = block.attention_tokens or n
        seen.append((attn, block.mlp_tokens or (left if block.attention_tokens is None
                                                else attn), left))
        stage_at += [i - 1] * (len(state.decisions) - stages_before)
        state = state.replace(x=logical.constrain(state.x))
      else:  # a run of blocks the method does not act at, up to the next it does
        e = next((j for j in range(i + 1, self.depth) if method.acts_at(opts, j)), self.depth)
        state = state.replace(x=run(i, e, state.x, state.policy(ctx),
                                    method.plain_bias(opts, state)))
        seen += [(state.x.shape[1],) * 3] * (e - i)
        i = e
      if tokens is not None and not ctx.masked and state.x.shape[1] != tokens[i - 1][2]:
        raise ValueError(f"method {red.method!r} left {state.x.shape[1]} tokens after block "
                         f"{i - 1}; its tokens() declares {tokens[i - 1][2]}.")
    if not train and _TOKEN_RECORDS:
      _TOKEN_RECORDS[-1][:] = [tuple(seen), tuple(stage_at)]

    x = (nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="encoder_norm")(
        state.x) if self.final_norm else state.x)
    live = state.policy(ctx)
    out = {
        "decisions": list(state.decisions),  # per stage (B, N0): 1 where the patch is kept
        "hosts": list(state.hosts),  # per stage (B, N0): host patch of each patch pruned there
        "keep_indices": list(state.keep_indices),  # per stage (B, k_s) kept patch positions
        # (B, P + N'): live tokens of the final sequence (all ones on the gather path).
        "live_mask": live if live is not None else jnp.ones(x.shape[:2], jnp.float32),
    }
    if method.merges:  # merged tokens: no single position (token distillation skips)
      out["token_sizes"] = (state.size if state.size is not None
                            else jnp.ones(x.shape[:2], jnp.float32))
    if state.size is not None:
      out["sizes"] = state.size * out["live_mask"]  # (B, P + N') patches each token stands for
    if state.carry is not None:
      out["carry"] = state.carry  # the method's own values after the last block
    if state.owner is not None:
      out["patch_token"] = state.owner  # (B, N0) index of each patch's final token, -1 if dropped
    return x, out


class VisionTransformer(nn.Module):
  """ViT / DeiT / big_vision ViT classifier. Build it with `Model(...)`, which validates."""
  num_classes: int | None
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: Any  # int or (h, w)
  image_size: Any  # int, (H, W), or None: taken from the input (then `reduction` may be a spec)
  reduction: Any  # a Reduction; with image_size None also a frozen spec (see `Model`)
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
  pool_type: str = "tok"  # POOL_TYPES
  posemb: str = "learn"  # POSEMBS
  gelu: str = "exact"  # layers.GELUS: "exact" (DeiT / timm) or "tanh" (big_vision)
  rep_size: Any = False  # int or True (= width): a `pre_logits` Dense + tanh before the head
  head_zeroinit: bool = False  # big_vision initialises the head's kernel at zero
  dropout: float = 0.0  # big_vision's dropout (after the embedding, in every block)
  scan: bool = False  # stacked blocks under lax.scan (big_vision's `scan=True`)
  remat_policy: str = "nothing_saveable"  # jax.checkpoint_policies name, with scan
  outputs_2d: bool = False  # also `pre_logits_2d` / `logits_2d` per grid cell (big_vision)
  # The ViTs timm and OpenCLIP publish (DeiT III, DINOv2, CLIP, MAE; docs/model.md):
  class_token: bool | None = None  # a cls token; None: where pool_type is "tok"
  num_registers: int = 0  # register tokens after cls (DINOv2 reg4): protected, never reduced
  layer_scale: float | None = None  # per-channel branch scales initialised at this value
  norm_pre: bool = False  # a LayerNorm `norm_pre` before the blocks (CLIP's ln_pre)
  fc_norm: bool = False  # the final LayerNorm `fc_norm` on the pooled vector, not the tokens
  mlp: str = "gelu"  # layers.MLPS: "swiglu" is DINOv2 giant's packed SwiGLU (mlp_dim = 2 x gated)

  @property
  def has_cls(self) -> bool:
    return prefix_tokens(self.pool_type, self.class_token, self.num_registers)[1]

  @property
  def has_probe(self) -> bool:
    """It pools with a MAP head, whose probe query can score tokens (score "map_probe")."""
    return self.pool_type == "map"

  @property
  def num_prefix(self) -> int:
    """Protected tokens leading the sequence: cls, registers, or pool "0"'s readout token 0."""
    return prefix_tokens(self.pool_type, self.class_token, self.num_registers)[0]

  @property
  def grid(self) -> tuple[int, int]:
    if self.image_size is None:
      raise ValueError("this model takes any image size; its grid is known from the input.")
    (h, w), (ph, pw) = _pair(self.image_size), _pair(self.patch_size)
    return h // ph, w // pw

  @property
  def num_patches(self) -> int:
    gh, gw = self.grid
    return gh * gw

  @property
  def dims(self) -> Dims:
    """The block sizes MACs are counted with; a SwiGLU MLP (D x M, then M / 2 x D) counts as
    a GELU MLP of width 3 M / 4 (exact where M is a multiple of 4, as every released one)."""
    mlp = self.mlp_dim if self.mlp == "gelu" else 3 * self.mlp_dim // 4
    return Dims(self.width, mlp, self.num_heads)

  @property
  def num_reducible(self) -> int:
    """Tokens a stage may prune (the patch tokens, less pool "0"'s readout token)."""
    return self.num_patches - int(self.pool_type == "0")

  def plan(self, num_patches: int | None = None) -> Reduction:
    """The Reduction this model runs on `num_patches` patches (its own grid by default)."""
    if isinstance(self.reduction, Reduction):
      return self.reduction
    n0 = self.num_patches if num_patches is None else num_patches
    return resolve_reduction(self.reduction, depth=self.depth,
                             num_patches=n0 - int(self.pool_type == "0"),
                             prefix=self.num_prefix, has_cls=self.has_cls,
                             has_probe=self.has_probe)

  def tokens(self) -> tuple[tuple[int, int, int], ...]:
    """Per block, the tokens (the prefix included) its attention runs on, its MLP runs on, and
    it leaves, at inference: as the method declares them (`Method.tokens`), or else read from
    the shapes its blocks produce in one abstract trace (needs an image_size)."""
    red = self.plan()
    if red.declares_tokens:
      return red.tokens()
    return self._traced("token counts")[0]

  def stage_blocks(self) -> tuple[int, ...]:
    """The blocks whose stages record decisions and hosts (drawn by `tps_jax.visualize`): as
    the method declares them (`Method.stage_blocks`), or else read from a trace."""
    red = self.plan()
    if declares(red.impl, "stage_blocks"):
      return red.stage_blocks
    return self._traced("stages")[1]

  def _traced(self, what: str):
    if self.image_size is None:
      raise ValueError(f"reading a method's {what} needs a model built with an image_size.")
    return traced_plan(self)

  def tokens_per_block(self) -> tuple[int, ...]:
    """Per block, the tokens (the prefix included) its MLP runs on, at inference."""
    return tuple(t[1] for t in self.tokens())

  @nn.compact
  def __call__(self, image, *, train: bool = False):
    """image (B, H, W, C) NHWC -> (logits (B, num_classes), out dict)."""
    ph, pw = _pair(self.patch_size)
    if self.image_size is not None:
      want = _pair(self.image_size) + (self.channels,)
      if image.ndim != 4 or image.shape[1:] != want:
        raise ValueError(f"image must be (B, {', '.join(map(str, want))}) NHWC for this model, "
                         f"got shape {image.shape}.")
    elif image.ndim != 4 or image.shape[1] % ph or image.shape[2] % pw:
      raise ValueError(f"image must be (B, H, W, C) NHWC with H, W multiples of the patch "
                       f"{(ph, pw)}, got shape {image.shape}.")
    out = {}
    gh, gw = image.shape[1] // ph, image.shape[2] // pw
    red = self.plan(gh * gw)
    x = PatchEmbedding(self.width, (ph, pw), dtype=self.dtype, name="embedding")(image)
    b, n0 = x.shape[:2]  # (B, N0, D)
    d = self.width
    lead = []  # tokens before the patches: cls, then registers
    # Created before the position table: flax numbers a module's draws in order.
    if self.has_cls:
      lead.append(self.param("cls", nn.initializers.zeros, (1, 1, d)))
    if self.num_registers:
      lead.append(self.param("registers", nn.initializers.normal(stddev=1e-6),
                             (1, self.num_registers, d)))
    lead = [jnp.broadcast_to(t, (b,) + t.shape[1:]).astype(x.dtype) for t in lead]
    num_lead = sum(t.shape[1] for t in lead)
    rows = n0 + num_lead if self.layout == "deit" else n0  # deit: the lead has positions
    if self.posemb == "learn":
      init = (nn.initializers.normal(stddev=0.02) if self.layout == "deit"
              else nn.initializers.normal(stddev=d ** -0.5))  # big_vision's
      pos = self.param("pos_embedding", init, (1, rows, d)).astype(x.dtype)
    else:
      pe = posemb.sincos2d(gh, gw, d, dtype=x.dtype)
      pos = jnp.concatenate([jnp.zeros((1, rows - n0, d), x.dtype), pe], axis=1)
    if pos.shape[1] == n0:
      x = jnp.concatenate(lead + [x + pos], axis=1)
    else:
      x = jnp.concatenate(lead + [x], axis=1) + pos
    x = logical.constrain(nn.Dropout(rate=self.dropout)(x, not train))
    if self.norm_pre:
      x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="norm_pre")(x)

    map_head = (pooling.MAPHead(self.num_heads, self.mlp_dim, self.width, dtype=self.dtype,
                                gelu=self.gelu, layer_norm_eps=self.layer_norm_eps,
                                name="MAPHead_0") if self.pool_type == "map" else None)
    probe = map_head.probe_query() if red.uses_probe else None
    x, enc_out = Encoder(self.depth, self.mlp_dim, self.num_heads, red, n0,
                         dtype=self.dtype, layer_norm_eps=self.layer_norm_eps,
                         gumbel_noise=self.gumbel_noise, attention=self.attention,
                         policy_form=self.policy_form, drop_path=self.drop_path,
                         remat=self.remat, prefix=self.num_prefix, has_cls=self.has_cls,
                         registers=self.num_registers, layer_scale=self.layer_scale,
                         mlp=self.mlp,
                         final_norm=not self.fc_norm, gelu=self.gelu, dropout=self.dropout,
                         scan=self.scan,
                         remat_policy=self.remat_policy,
                         track_sizes=self.pool_type in ("gap", "map"),
                         track_owner=self.outputs_2d, ordered=self.pool_type == "none",
                         name="Transformer")(x, train=train, probe=probe)
    out.update(enc_out)
    out["encoded"] = x
    weight = enc_out.get("sizes")
    if self.pool_type in ("tok", "0"):
      x = out["head_input"] = x[:, 0]
    elif self.pool_type == "gap":  # over the patch tokens (cls and registers left out)
      p = self.num_prefix
      x = out["head_input"] = pooling.weighted_mean(
          x[:, p:], weight[:, p:] if weight is not None else None)
    elif self.pool_type == "map":
      x = out["head_input"] = map_head(
          x, weight, ops.attention.POLICY_EPS if train and red.learned else 0.0)
    if self.fc_norm:
      x = out["head_input"] = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,
                                           name="fc_norm")(x)
    x_2d = None
    if self.outputs_2d:  # each grid cell takes the value of the token its patch ended in
      owner = enc_out["patch_token"]
      cells = jnp.take_along_axis(out["encoded"], jnp.maximum(owner, 0)[..., None], axis=1)
      x_2d = jnp.where(owner[..., None] >= 0, cells, 0).reshape(b, gh, gw, -1)

    if self.rep_size:
      rep = d if self.rep_size is True else int(self.rep_size)
      hid = nn.Dense(rep, dtype=self.dtype, name="pre_logits")
      x = jnp.tanh(hid(x))
      x_2d = jnp.tanh(hid(x_2d)) if x_2d is not None else None
    out["pre_logits"] = x
    if x_2d is not None:
      out["pre_logits_2d"] = x_2d
    if self.num_classes:
      kw = {"kernel_init": nn.initializers.zeros} if self.head_zeroinit else {}
      head = nn.Dense(self.num_classes, dtype=self.dtype, name="head", **kw)
      x = out["logits"] = head(x)
      if x_2d is not None:
        out["logits_2d"] = head(x_2d)
    return x, out


def Model(num_classes: int | None = None, *, variant: str | None = None,  # noqa: N802
          reduction: Any = None, image_size: Any = 224, layout: str = "deit",
          **kw) -> VisionTransformer:
  """Builds a ViT (big_vision's `Model(num_classes, *, variant, **kw)`).

  Args:
    num_classes: the head's outputs; None or 0 for none (`out["pre_logits"]` is the output).
    variant: "Ti/16", "S/16", "B/16", "L/16", "So400m/14", ...: fills width, depth, mlp_dim,
      num_heads and patch_size; any of them in `kw` overrides it.
    reduction: None (dense), a method name, a spec mapping {"method": name, ...} (that
      method's keys: `tps_jax.methods.get(name).options`) or a `methods.Reduction`.
    image_size: int or (H, W); None takes the size from each input (the reduction is then
      resolved per input grid).
    layout: "deit" (cls has a position embedding) or "big_vision".
    **kw: the VisionTransformer fields (pool_type, posemb, gelu, scan, remat, dtype, ...) and
      flax's `name` / `parent`.
  Returns:
    The VisionTransformer; `model.apply({"params": p}, images_nhwc, train=...)` returns
    `(logits, out)`. Raises ValueError naming what cannot work, at construction.
  """
  cfg = {**decode_variant(variant), **kw}
  missing = [k for k in ("width", "depth", "num_heads", "patch_size") if k not in cfg]
  if missing:
    raise ValueError(f"Model needs {missing} (or a variant such as 'S/16').")
  if cfg.get("mlp_dim") is None:
    cfg["mlp_dim"] = 4 * cfg["width"]
  if cfg.get("gelu") is None:  # big_vision / AugReg / SigLIP: flax's tanh GELU; DeiT: exact
    cfg["gelu"] = "tanh" if layout == "big_vision" else "exact"
  checks = (("policy_form", ops.POLICY_FORMS, "exact"), ("attention", IMPLEMENTATIONS, "auto"),
            ("pool_type", POOL_TYPES, "tok"), ("posemb", POSEMBS, "learn"),
            ("gelu", GELUS, "exact"), ("mlp", MLPS, "gelu"))
  for key, allowed, default in checks:
    if str(cfg.get(key, default)) not in allowed:
      raise ValueError(f"unknown {key} {cfg[key]!r}; expected one of {allowed}.")
  if "pool_type" in cfg:
    cfg["pool_type"] = str(cfg["pool_type"])
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}.")
  patch = _pair(cfg["patch_size"])
  cfg["patch_size"] = patch[0] if patch[0] == patch[1] else patch
  if cfg.get("mlp") == "swiglu" and cfg["mlp_dim"] % 2:
    raise ValueError(f"mlp 'swiglu' splits mlp_dim in two halves; {cfg['mlp_dim']} is odd.")
  if cfg["width"] % cfg["num_heads"]:
    raise ValueError(f"width {cfg['width']} is not divisible by num_heads {cfg['num_heads']}.")
  if cfg.get("posemb") == "sincos2d" and cfg["width"] % 4:
    raise ValueError(f"posemb 'sincos2d' needs a width divisible by 4, got {cfg['width']}.")
  if cfg.get("scan") and cfg.get("remat"):
    raise ValueError("scan rematerialises its blocks already (remat_policy); leave remat off.")
  pool = cfg.get("pool_type", "tok")
  prefix, has_cls = prefix_tokens(pool, cfg.get("class_token"), cfg.get("num_registers", 0))
  if cfg.get("fc_norm") and pool in ("none",):
    raise ValueError("fc_norm normalises a pooled vector; pool_type 'none' has none.")
  if image_size is None:  # the grid comes with each input: keep the spec, check its keys now
    if isinstance(reduction, Reduction):
      raise ValueError("image_size=None takes a reduction spec (a dict or method name), not a "
                       "Reduction resolved for one token count.")
    _check_spec(reduction, depth=cfg["depth"], prefix=prefix, has_cls=has_cls,
                has_probe=pool == "map")
    return VisionTransformer(num_classes=num_classes, image_size=None, layout=layout,
                             reduction=freeze(reduction), **cfg)
  size = _pair(image_size)
  if size[0] % patch[0] or size[1] % patch[1]:
    raise ValueError(f"image_size {image_size} is not a multiple of patch_size "
                     f"{cfg['patch_size']}.")
  num_patches = (size[0] // patch[0]) * (size[1] // patch[1])
  reducible = num_patches - int(pool == "0")
  reduction = Reduction.create(reduction, depth=cfg["depth"], num_patches=reducible,
                               prefix=prefix, has_cls=has_cls, has_probe=pool == "map")
  return VisionTransformer(num_classes=num_classes, image_size=image_size, layout=layout,
                           reduction=reduction, **cfg)


def prefix_tokens(pool_type: str, class_token: bool | None,
                  num_registers: int) -> tuple[int, bool]:
  """(protected tokens leading the sequence, whether token 0 is a cls token) of a model: cls
  (pool "tok", or `class_token`), then `num_registers` registers, or pool "0"'s readout patch.
  Raises ValueError for a combination no model has."""
  has_cls = pool_type == "tok" if class_token is None else bool(class_token)
  if pool_type == "tok" and not has_cls:
    raise ValueError("pool_type 'tok' reads out the cls token; class_token=False leaves none.")
  if int(num_registers) < 0:
    raise ValueError(f"num_registers must be >= 0, got {num_registers}.")
  if pool_type == "0" and (has_cls or num_registers):
    raise ValueError("pool_type '0' reads out patch 0; it takes no cls or register tokens.")
  return int(has_cls) + int(num_registers) + int(pool_type == "0"), has_cls


def _check_spec(spec, *, depth: int, prefix: int, has_cls: bool, has_probe: bool) -> None:
  """Names a bad method, key or location of a spec before any grid is known (checked on a
  large grid; keep_counts, which depend on the grid, at the first call)."""
  probe = dict(spec) if isinstance(spec, Mapping) else spec
  if isinstance(probe, dict):
    probe.pop("keep_counts", None)
  Reduction.create(probe, depth=depth, num_patches=4096, prefix=prefix, has_cls=has_cls,
                   has_probe=has_probe)


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
