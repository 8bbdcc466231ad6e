"""Transformer layers with big_vision parameter names, open for token reduction.

`Encoder1DBlock` is split into its two residual halves, `attend` and `feed`, so
a reduction inside a block can act between them (`tps_jax.methods.Block` lists what a method
may call), and the attention can run under a training policy (masked decisions) or a logit
bias (ToMe's size bias). Parameter names match big_vision's ViT (`LayerNorm_0`,
`MultiHeadDotProductAttention_0/{query,key,value,out}`, `LayerNorm_1`,
`MlpBlock_0/Dense_{0,1}`), so its checkpoints load.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tps_jax import ops
from tps_jax.ops.dtypes import upcast

Dtype = Any
# The GELUs ViTs use: DeiT / timm (PyTorch's nn.GELU) the exact erf one; big_vision, AugReg
# and SigLIP flax's default `nn.gelu`, the tanh approximation (6e-4 apart in logits); OpenAI's
# CLIP x sigmoid(1.702 x) ("quick").
GELUS = ("exact", "tanh", "quick")
# The MLPs: "gelu", Dense -> GELU -> Dense; "swiglu", the packed SwiGLU of DINOv2's giant
# models (timm's `SwiGLUPacked`): Dense_0 (D, M) gives two halves a, b of M / 2 each, then
# silu(a) * b -> Dense_1 (M / 2, D).
MLPS = ("gelu", "swiglu")


def gelu(x, kind: str = "exact"):
  """GELU of `kind` ("exact": erf, as PyTorch; "tanh": flax's default approximation;
  "quick": x sigmoid(1.702 x), OpenAI CLIP's)."""
  if kind not in GELUS:
    raise ValueError(f"unknown gelu {kind!r}; expected one of {GELUS}.")
  if kind == "quick":
    return x * jax.nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)
  return nn.gelu(x, approximate=kind == "tanh")


class MlpBlock(nn.Module):
  """Dense -> GELU -> (dropout) -> Dense, (B, N, D) -> (B, N, D); with `kind` "swiglu" the
  packed SwiGLU (MLPS): `mlp_dim` is Dense_0's width, twice the gated width."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  gelu: str = "exact"  # GELUS
  dropout: float = 0.0
  deterministic: bool = True
  kind: str = "gelu"  # MLPS

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    if self.kind == "swiglu":
      a, b = jnp.split(x, 2, axis=-1)
      x = nn.silu(a) * b
    else:
      x = gelu(x, self.gelu)
    x = nn.Dropout(rate=self.dropout)(x, self.deterministic)
    return nn.Dense(d, dtype=self.dtype, name="Dense_1")(x)


class PatchEmbedding(nn.Module):
  """Non-overlapping patches, (B, H, W, C) -> (B, H/ph * W/pw, features), row-major.

  The parameters (`kernel` (ph, pw, C, features), `bias`), their initialisation and the
  result are `nn.Conv(features, (ph, pw), strides=(ph, pw), padding="VALID")`'s, so
  big_vision checkpoints load; the product is one (B N, ph pw C) @ (ph pw C, features)
  matmul of the patches, which a GPU runs on its matrix units (a convolution over 3 input
  channels uses them poorly).
  """
  features: int
  patch_size: Any  # int or (ph, pw)
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()  # nn.Conv's default, fan-in ph pw C

  @nn.compact
  def __call__(self, image):
    b, h, w, c = image.shape
    ph, pw = ((self.patch_size, self.patch_size) if isinstance(self.patch_size, int)
              else tuple(self.patch_size))
    if h % ph or w % pw:
      raise ValueError(f"image {h}x{w} does not split into {ph}x{pw} patches.")
    kernel = self.param("kernel", self.kernel_init, (ph, pw, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    image, kernel, bias = nn.dtypes.promote_dtype(image, kernel, bias, dtype=self.dtype)
    patches = image.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, (h // ph) * (w // pw), ph * pw * c)  # (B, N0, ph pw C)
    return patches @ kernel.reshape(ph * pw * c, self.features) + bias  # (B, N0, features)


class AttentionOut(NamedTuple):
  """What the block's `attend` / `attend_matrix` return besides its output: scores computed
  from the attention's primitives (`MultiHeadDotProductAttention`).

  cls_attn: (B, H, N) softmax attention from token 0 to every token, float32,
    or None when not asked for.
  keys: (B, N, D/H) keys averaged over heads (ToMe's metric), or None.
  received: (B, H, N) attention each token receives, averaged over queries (a
    cls-free importance score), float32, or None when not asked for.
  mean_query: (B, H, N) softmax attention from the mean query (the average token's
    view: a cls-free score at the cost of one row), float32, or None.
  probs: (B, H, N, N) the whole softmax attention, float32, or None (MCTF).
  probe: (B, H, N) softmax attention from a given query per head (a MAP head's probe
    query: the tokens the pooling looks for), float32, or None.
  values: (B, N, H, D/H) the value vectors, or None (scores that weigh attention by the
    values' norms, such as ATS's and PPT's).
  """
  cls_attn: jax.Array | None
  keys: jax.Array | None
  received: jax.Array | None = None
  mean_query: jax.Array | None = None
  probs: jax.Array | None = None
  probe: jax.Array | None = None
  values: jax.Array | None = None


class HeadsDense(nn.Module):
  """`nn.DenseGeneral` between the width and (heads, head width), whichever way `to_heads`
  says, sized from its input: (B, N, D) -> (B, N, H, D/H), or (B, N, H, D/H) -> (B, N, D).
  Parameters, initialisation and product are DenseGeneral's (`kernel` (D, H, D/H) or
  (H, D/H, D), `bias`), so big_vision's names and checkpoints hold."""
  num_heads: int
  to_heads: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.to_heads:
      d = x.shape[-1]
      if d % self.num_heads:
        raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}.")
      in_shape, out_shape, axes = (d,), (self.num_heads, d // self.num_heads), ((x.ndim - 1,),
                                                                                 (0,))
    else:
      in_shape, out_shape, axes = x.shape[-2:], (x.shape[-2] * x.shape[-1],), (
          (x.ndim - 2, x.ndim - 1), (0, 1))
    flat = (int(np.prod(in_shape)), int(np.prod(out_shape)))
    kernel = self.param("kernel", lambda rng, shape: jnp.reshape(
        nn.initializers.lecun_normal()(rng, flat, jnp.float32), shape), in_shape + out_shape)
    bias = self.param("bias", lambda rng, shape: jnp.zeros(shape, jnp.float32), out_shape)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    return jax.lax.dot_general(x, kernel, (axes, ((), ()))) + bias


IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


def _heads_first(t):  # (B, N, H, d) -> (B, H, N, d)
  return t.transpose(0, 2, 1, 3)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention as primitives that a method composes: `qkv`, `attention` under a bias or
  a policy, `probs` (the whole softmax matrix), `project`. It carries no flag for any
  method: scores (a cls row, a mean-query row, the attention received) are functions of these
  (`ops.attention_row`, the block's `attend` / `attend_matrix`).

  Parameters are laid out as flax's `nn.MultiHeadDotProductAttention`:
  query/key/value kernels (D, H, D/H), out kernel (H, D/H, D).

  `implementation`: "einsum" (explicit (B, H, N, d) einsums; fastest on CPU),
  "xla" (`jax.nn.dot_product_attention`, XLA's own composition), "cudnn"
  (the same call with cuDNN's flash kernel: GPU, bfloat16 / float16 only), or
  "auto": cudnn on a GPU in bfloat16 / float16 (head dim a multiple of 8), xla on
  other accelerators and float32, einsum on CPU. Under a policy, `policy_form` decides
  instead (`ops.POLICY_FORMS`); its kernel forms "fused" and "log_bias" run on cuDNN
  where the implementation resolves to it.
  """
  num_heads: int
  dtype: Dtype = jnp.float32
  implementation: str = "auto"
  policy_form: str = "exact"

  def setup(self):
    heads = lambda name: HeadsDense(self.num_heads, dtype=self.dtype, name=name)
    self.query, self.key, self.value = heads("query"), heads("key"), heads("value")
    self.out = HeadsDense(self.num_heads, to_heads=False, dtype=self.dtype, name="out")

  def fused(self, head_dim: int, dtype=None) -> str | None:
    """The `ops.dot_product_attention` implementation `attention` uses, or None for einsums."""
    if self.implementation not in IMPLEMENTATIONS:
      raise ValueError(f"unknown attention implementation {self.implementation!r}; "
                       f"expected one of {IMPLEMENTATIONS}.")
    if self.implementation != "auto":
      return {"einsum": None, "xla": "xla", "cudnn": "cudnn"}[self.implementation]
    backend = jax.default_backend()
    if backend == "cpu":
      return None
    cudnn = jnp.dtype(self.dtype) in ops.attention.CUDNN_DTYPES and head_dim % 8 == 0
    return "cudnn" if backend == "gpu" and cudnn else "xla"

  def qkv(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, N, D) -> queries, keys, values, each (B, N, H, D/H) (queries unscaled)."""
    return self.query(x), self.key(x), self.value(x)

  def probs(self, q, k, *, bias=None, policy=None) -> jax.Array:
    """The softmax attention (B, H, N, N), float32, of queries q against keys k; `bias` is
    added to the logits, `policy` (B, N) makes masked keys invisible (ops.policy_softmax)."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhqd,bhkd->bhqk", _heads_first(q) * jnp.asarray(scale, q.dtype),
                        _heads_first(k))
    if bias is not None:
      logits = logits + bias
    return (jax.nn.softmax(upcast(logits), axis=-1) if policy is None
            else ops.policy_softmax(upcast(logits), policy))

  def attention(self, q, k, v, *, bias=None, policy=None) -> jax.Array:
    """softmax(q k^T / sqrt(d) + bias) v: (B, N, H, D/H), in the configured implementation;
    under a `policy` (B, N) 0/1 (no bias then) in `policy_form`."""
    scale = q.shape[-1] ** -0.5
    fused = self.fused(q.shape[-1])
    if policy is not None:
      if bias is not None:
        raise ValueError("attention under a policy takes no bias unless it forms the whole "
                         "matrix (probs).")
      return ops.policy_attention(q * jnp.asarray(scale, q.dtype), k, v, policy,
                                  form=self.policy_form, implementation=fused or "xla")
    if fused:
      if bias is not None and fused == "cudnn":  # cuDNN takes the bias in q's dtype
        bias = bias.astype(q.dtype)
      return ops.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=fused)
    return self.mix(self.probs(q, k, bias=bias).astype(v.dtype), v)

  @staticmethod
  def mix(probs, v) -> jax.Array:
    """probs (B, H, N, M) applied to values v (B, M, H, D/H) -> (B, N, H, D/H)."""
    return jnp.einsum("bhqk,bhkd->bhqd", probs, _heads_first(v)).transpose(0, 2, 1, 3)

  def project(self, y) -> jax.Array:
    """The output projection: (B, N, H, D/H) -> (B, N, D)."""
    return self.out(y)

  def __call__(self, x, *, policy=None, bias=None) -> jax.Array:
    """Plain self-attention: x (B, N, D) -> (B, N, D)."""
    return self.project(self.attention(*self.qkv(x), bias=bias, policy=policy))


class LayerScale(nn.Module):
  """x * scale, a learned (D,) scale per channel initialised at `init` (Touvron et al.,
  CaiT, 2021); (..., D) -> (..., D) in x's dtype."""
  init: float

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.constant(self.init), (x.shape[-1],),
                       jnp.float32)
    return x * scale.astype(x.dtype)


def drop_path(module: nn.Module, y: jax.Array, rate, deterministic: bool) -> jax.Array:
  """Stochastic depth: zero a residual branch y (B, ...) per example, scale the rest.

  `rate` is a float, or a traced scalar (blocks scanned over depth with a rate each).
  """
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return y
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, (y.shape[0],))
  return y * (keep.astype(y.dtype) / (1.0 - rate)).reshape((-1,) + (1,) * (y.ndim - 1))


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block, x + Attn(LN(x)), then x + MLP(LN(x)).

  `drop_path` > 0 with `deterministic=False` drops each residual branch per
  example, `dropout` > 0 drops activations after the attention and inside and
  after the MLP, as big_vision does (both rng stream "dropout"). `layer_scale` (CaiT's,
  timm's `init_values`: DeiT III, DINOv2) multiplies each branch by a learned per-channel
  scale (`LayerScale_0`, `LayerScale_1`) initialised at that value.
  """
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  implementation: str = "auto"  # MultiHeadDotProductAttention.implementation
  policy_form: str = "exact"  # MultiHeadDotProductAttention.policy_form
  drop_path: float = 0.0
  deterministic: bool = True
  gelu: str = "exact"  # GELUS
  dropout: float = 0.0
  layer_scale: float | None = None
  mlp: str = "gelu"  # MLPS

  def setup(self):
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    self.LayerNorm_0 = ln("LayerNorm_0")
    self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, implementation=self.implementation,
        policy_form=self.policy_form, name="MultiHeadDotProductAttention_0")
    self.LayerNorm_1 = ln("LayerNorm_1")
    self.MlpBlock_0 = MlpBlock(self.mlp_dim, dtype=self.dtype, gelu=self.gelu,
                               dropout=self.dropout, deterministic=self.deterministic,
                               kind=self.mlp, name="MlpBlock_0")
    self.Dropout_0 = nn.Dropout(rate=self.dropout)
    if self.layer_scale is not None:
      self.layer_scales = [LayerScale(self.layer_scale, name=f"LayerScale_{i}") for i in (0, 1)]

  def _scale(self, which: int, y):
    """y times branch `which`'s layer scale (y itself without layer scale)."""
    return y if self.layer_scale is None else self.layer_scales[which](y)

  def _branch(self, y, rate):
    y = self.Dropout_0(y, self.deterministic)
    return drop_path(self, y, self.drop_path if rate is None else rate, self.deterministic)

  # The public functions take arrays only, so nn.remat can lift them (see BLOCK_FUNCTIONS);
  # each calls unlifted helpers, so a rematerialised __call__ does not nest checkpoints.
  def _qkv(self, x):
    return self.MultiHeadDotProductAttention_0.qkv(self.LayerNorm_0(x))

  def _residual(self, x, y, rate=None) -> jax.Array:
    return x + self._branch(self._scale(0, self.MultiHeadDotProductAttention_0.project(y)), rate)

  def _feed(self, x, rate=None) -> jax.Array:
    y = self._scale(1, self.MlpBlock_0(self.LayerNorm_1(x)))
    return x + self._branch(y, rate)

  def _scores(self, q, k, v, probe, *, attn=None, bias=None, policy=None) -> AttentionOut:
    """The rows a method may score with (cls, mean query, probe), the head-mean keys and the
    values; from the attention matrix `attn` where it was formed."""
    row = lambda query: ops.attention_row(query, k, bias=bias)
    cls = upcast(attn[:, :, 0]) if attn is not None else row(q[:, 0])
    mean_query = row(jnp.mean(q, axis=1)) if policy is None and probe is None else None
    probe_row = None
    if probe is not None:  # in place of the mean query's row
      if policy is not None:
        raise ValueError("a probe query's attention row is not taken under a policy.")
      probe_row = row(jnp.broadcast_to(probe.astype(k.dtype), (k.shape[0],) + probe.shape))
    return AttentionOut(cls, jnp.mean(k, axis=2), mean_query=mean_query, probe=probe_row,
                        values=v)

  # Primitives: what a method composes.
  def qkv(self, x) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (B, N, D) -> queries, keys, values of LN(x), each (B, N, H, D/H)."""
    return self._qkv(x)

  def attention(self, q, k, v, bias=None, policy=None) -> jax.Array:
    """The attention of q, k, v (B, N, H, D/H) under a logit `bias` or a `policy` (B, N)
    -> (B, N, H, D/H), in the block's implementation."""
    return self.MultiHeadDotProductAttention_0.attention(q, k, v, bias=bias, policy=policy)

  def probs(self, q, k, bias=None, policy=None) -> jax.Array:
    """The whole softmax attention (B, H, N, N), float32."""
    return self.MultiHeadDotProductAttention_0.probs(q, k, bias=bias, policy=policy)

  def residual(self, x, y) -> jax.Array:
    """The first half's end: x + out_projection(y), y (B, N, H, D/H) (dropout, drop path)."""
    return self._residual(x, y)

  def feed(self, x) -> jax.Array:
    """Second half: (B, N', D) -> (B, N', D), x + MLP(LN x); N' may differ from the first's."""
    return self._feed(x)

  # Compositions of the primitives that the built-in methods share.
  def attend(self, x, bias=None, probe=None) -> tuple[jax.Array, AttentionOut]:
    """First half: x (B, N, D) -> (B, N, D), plus its `AttentionOut` (cls row, head-mean
    keys, mean-query row or, given a query per head `probe` (H, D/H), its row; values).

    bias: additive logit bias (B, 1|H, 1|N, N) (ToMe's size bias) or None. Under jit XLA drops
    the scores the caller ignores.
    """
    q, k, v = self._qkv(x)
    attn = None
    if self.MultiHeadDotProductAttention_0.fused(q.shape[-1]):
      y = self.attention(q, k, v, bias=bias)
    else:  # einsums form the matrix anyway: the cls row is its first row
      attn = self.probs(q, k, bias=bias).astype(v.dtype)
      y = MultiHeadDotProductAttention.mix(attn, v)
    return self._residual(x, y), self._scores(q, k, v, probe, attn=attn, bias=bias)

  def attend_matrix(self, x, bias=None, policy=None,
                    probe=None) -> tuple[jax.Array, AttentionOut]:
    """`attend` that forms the whole attention matrix, whatever the implementation, and also
    returns each token's attention received (its column means) and the matrix itself
    (B, H, N, N); under a `policy` (B, N) (no mean-query row then) its softmax ignores the
    dropped keys (ops.policy_softmax)."""
    q, k, v = self._qkv(x)
    attn = self.probs(q, k, bias=bias, policy=policy).astype(v.dtype)
    y = MultiHeadDotProductAttention.mix(attn, v)
    info = self._scores(q, k, v, probe, attn=attn, bias=bias, policy=policy)
    return self._residual(x, y), info._replace(received=jnp.mean(upcast(attn), axis=2),
                                               probs=upcast(attn))

  def attention_probs(self, x, bias=None) -> jax.Array:
    """The softmax attention of LN(x) alone: (B, N, D) -> (B, H, N, N) float32 (MCTF's
    one step ahead looks at it before merging)."""
    mha, y = self.MultiHeadDotProductAttention_0, self.LayerNorm_0(x)
    return self.probs(mha.query(y), mha.key(y), bias=bias)  # no values: none traced

  def attend_ahead(self, x, probs, value_index, base, src, dst, weights) -> jax.Array:
    """First half on merged tokens with the attention of the tokens before the merge:
    x (B, N', D), probs (B, H, N, N), value_index (B, N) in [0, N'), the merge's plan (base,
    src, dst) and pooling weights (B, N) -> (B, N', D): out(merge(probs @ v[value_index])),
    queries averaged by the weights and keys summed by the plan, without forming the merged
    matrix (MCTF's one step ahead)."""
    v = self.MultiHeadDotProductAttention_0.value(self.LayerNorm_0(x))  # (B, N', H, hd)
    v = jnp.take_along_axis(v, value_index[:, :, None, None], axis=1)  # (B, N, H, hd)
    y = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    b, n, h, hd = y.shape
    y = ops.planned_merge(y.reshape(b, n, h * hd), weights, ops.MergePlan(base, src, dst))[0]
    return self._residual(x, y.reshape(b, -1, h, hd).astype(v.dtype))

  def __call__(self, x, policy=None, rate=None, bias=None):
    """The whole block; policy (B, N) 0/1 masks attention to dropped tokens (dTPS training);
    bias (B, 1|H, 1|N, N) is added to the attention logits (ToMe's size bias) or None.

    rate: this block's stochastic-depth rate as an array (scanned blocks), else `drop_path`.
    """
    q, k, v = self._qkv(x)
    x = self._residual(x, self.MultiHeadDotProductAttention_0.attention(
        q, k, v, bias=bias, policy=policy), rate)
    return self._feed(x, rate=rate)


# The block's functions (tps_jax.methods.Block offers them to the reduction methods), which
# `nn.remat(Encoder1DBlock, methods=BLOCK_FUNCTIONS)` rematerialises: every way the encoder runs
# a block, whole or in halves around a reduction.
BLOCK_FUNCTIONS = ("__call__", "qkv", "attention", "probs", "residual", "feed", "attend",
                   "attend_matrix", "attention_probs", "attend_ahead")
