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

from tps_jax import ops
from tps_jax.ops.dtypes import upcast

Dtype = Any
# The two GELUs ViTs use: DeiT / timm (PyTorch's nn.GELU) the exact erf one; big_vision,
# AugReg and SigLIP flax's default `nn.gelu`, the tanh approximation (6e-4 apart in logits).
GELUS = ("exact", "tanh")


def gelu(x, kind: str = "exact"):
  """GELU of `kind` ("exact": erf, as PyTorch; "tanh": flax's default approximation)."""
  if kind not in GELUS:
    raise ValueError(f"unknown gelu {kind!r}; expected one of {GELUS}.")
  return nn.gelu(x, approximate=kind == "tanh")


class MlpBlock(nn.Module):
  """Dense -> GELU -> (dropout) -> Dense, (B, N, D) -> (B, N, D)."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  gelu: str = "exact"  # GELUS
  dropout: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="Dense_0")(x)
    x = gelu(x, self.gelu)
    x = nn.Dropout(rate=self.dropout)(x, self.deterministic)
    return nn.Dense(d, dtype=self.dtype, name="Dense_1")(x)


class PatchEmbedding(nn.Module):
  """Non-overlapping patches, (B, H, W, C) -> (B, H/ph * W/pw, features), row-major.

  The parameters (`kernel` (ph, pw, C, features), `bias`), their initialisation and the
  result are `nn.Conv(features, (ph, pw), strides=(ph, pw), padding="VALID")`'s, so
  big_vision checkpoints load; the product is one (B N, ph pw C) @ (ph pw C, features)
  matmul of the patches, which a GPU runs on its matrix units (cuDNN's convolution over 3
  input channels took 1.6 ms of an H100's DeiT-S train step, forward and backward).
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
  """What one attention call returns besides its output.

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


IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn")


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with optional policy (dTPS training) or additive logit bias (ToMe).

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

  def _fused(self, head_dim: int) -> str | None:
    """The `ops.dot_product_attention` implementation to use, or None for einsums."""
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

  @nn.compact
  def __call__(self, x, *, policy=None, bias=None, extras=False, matrix=False,
               probs_only=False, given=None,
               probe=None) -> tuple[jax.Array | None, AttentionOut]:
    """x (B, N, D) -> (output (B, N, D), AttentionOut).

    Args:
      policy: (B, N) 0/1, attention to 0 tokens masked (the masked training form), or None;
        with `matrix` also a straight-through float mask, beside a bias (DiffRate's search).
      bias: (B, 1|H, 1|N, N) added to the logits, or None.
      extras: also return the cls row, the head-mean keys, the mean query's row and the
        values.
      matrix: form the whole attention matrix (whatever the implementation) and also return
        the attention received and the matrix itself.
      probs_only: return only the softmax attention of x (B, H, N, N) (output None).
      given: (probs (B, H, N, N), value_index (B, N'), plan, weights (B, N)) on merged tokens x
        (B, N', D): out(merge(probs @ v[value_index])), the merged attention matrix's output
        (queries averaged by the weights, keys summed by the MergePlan), without forming that
        matrix (MCTF's one step ahead).
      probe: (H, D/H) one query per head (unscaled), or None: return its attention row
        against this call's keys (`AttentionOut.probe`) instead of the mean query's; not
        under a policy.
    """
    _, _, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by num_heads={self.num_heads}.")
    head_dim = d // self.num_heads
    dense = lambda name: nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                         name=name)
    out_dense = lambda: nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="out")
    scale = head_dim ** -0.5
    if given is not None:
      given_probs, value_index, plan, weights = given
      v = dense("value")(x)  # (B, N', H, hd)
      v = jnp.take_along_axis(v, value_index[:, :, None, None], axis=1)  # (B, N, H, hd)
      y = jnp.einsum("bhqk,bkhd->bqhd", given_probs.astype(v.dtype), v)
      b, n, h, hd = y.shape
      y = ops.planned_merge(y.reshape(b, n, h * hd), weights, plan)[0]
      y = y.reshape(b, -1, h, hd).astype(v.dtype)
      return out_dense()(y), AttentionOut(None, None)
    if probs_only:
      q, k = dense("query")(x), dense("key")(x)
      logits = jnp.einsum("bqhd,bkhd->bhqk", q * jnp.asarray(scale, q.dtype), k)
      if bias is not None:
        logits = logits + bias
      return None, AttentionOut(None, None, probs=jax.nn.softmax(upcast(logits), axis=-1))
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)  # (B, N, H, hd)
    cls_attn = received = mean_query = probs = None
    fused = self._fused(head_dim)

    def row_softmax(query):  # (B, H, hd) one query per head -> (B, H, N) float32
      logits = jnp.einsum("bhd,bkhd->bhk", query, k, preferred_element_type=jnp.float32) * scale
      if bias is not None:
        logits = logits + jnp.broadcast_to(bias, logits.shape[:1] + bias.shape[1:])[:, :, 0]
      return jax.nn.softmax(logits, axis=-1)

    probe_attn = None
    if extras and policy is None and probe is None:
      mean_query = row_softmax(jnp.mean(q, axis=1))
    if probe is not None:  # in place of the mean query's row
      if policy is not None:
        raise ValueError("a probe query's attention row is not taken under a policy.")
      probe_attn = row_softmax(jnp.broadcast_to(probe.astype(k.dtype),
                                                (k.shape[0],) + probe.shape))

    if policy is not None and not matrix:
      if extras or bias is not None:
        raise ValueError("attention under a policy takes no bias and returns no cls attention "
                         "unless it forms the whole matrix (matrix=True).")
      y = ops.policy_attention(q * jnp.asarray(scale, q.dtype), k, v, policy,
                               form=self.policy_form, implementation=fused or "xla")
    elif fused and not matrix:
      if bias is not None and fused == "cudnn":  # cuDNN takes the bias in q's dtype
        bias = bias.astype(q.dtype)
      y = ops.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation=fused)
      if extras:  # one query row: cheap beside the fused attention
        cls_attn = row_softmax(q[:, 0])
    else:
      heads_first = lambda t: t.transpose(0, 2, 1, 3)  # (B, H, N, hd)
      logits = jnp.einsum("bhqd,bhkd->bhqk", heads_first(q) * jnp.asarray(scale, q.dtype),
                          heads_first(k))
      if bias is not None:
        logits = logits + bias
      attn = (jax.nn.softmax(upcast(logits), axis=-1) if policy is None
              else ops.policy_softmax(upcast(logits), policy)).astype(logits.dtype)
      y = jnp.einsum("bhqk,bhkd->bhqd", attn, heads_first(v)).transpose(0, 2, 1, 3)
      if extras:
        cls_attn = upcast(attn[:, :, 0])
      if matrix:  # the whole matrix is at hand: its column means too
        received = jnp.mean(upcast(attn), axis=2)
        probs = upcast(attn)

    out = out_dense()(y)
    keys = jnp.mean(k, axis=2) if extras else None
    return out, AttentionOut(cls_attn, keys, received, mean_query, probs, probe_attn,
                             v if extras else None)


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
  after the MLP, as big_vision does (both rng stream "dropout").
  """
  mlp_dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  layer_norm_eps: float = 1e-6
  attention: str = "auto"  # MultiHeadDotProductAttention.implementation
  policy_form: str = "exact"  # MultiHeadDotProductAttention.policy_form
  drop_path: float = 0.0
  deterministic: bool = True
  gelu: str = "exact"  # GELUS
  dropout: float = 0.0

  def setup(self):
    ln = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    self.LayerNorm_0 = ln("LayerNorm_0")
    self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, implementation=self.attention,
        policy_form=self.policy_form, name="MultiHeadDotProductAttention_0")
    self.LayerNorm_1 = ln("LayerNorm_1")
    self.MlpBlock_0 = MlpBlock(self.mlp_dim, dtype=self.dtype, gelu=self.gelu,
                               dropout=self.dropout, deterministic=self.deterministic,
                               name="MlpBlock_0")
    self.Dropout_0 = nn.Dropout(rate=self.dropout)

  def _branch(self, y, rate):
    y = self.Dropout_0(y, self.deterministic)
    return drop_path(self, y, self.drop_path if rate is None else rate, self.deterministic)

  # The public halves take arrays only, so nn.remat can lift them (see BLOCK_FUNCTIONS); each
  # calls an unlifted helper, so a rematerialised __call__ does not nest checkpoints.
  def _attend(self, x, rate=None, **attn_kw) -> tuple[jax.Array, AttentionOut]:
    y, info = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x), **attn_kw)
    return x + self._branch(y, rate), info

  def _feed(self, x, rate=None) -> jax.Array:
    y = self.MlpBlock_0(self.LayerNorm_1(x))
    return x + self._branch(y, rate)

  def attend(self, x, bias=None, probe=None) -> tuple[jax.Array, AttentionOut]:
    """First half: x (B, N, D) -> (B, N, D), plus the cls attention row, mean keys and the
    mean-query row.

    bias: additive logit bias (B, 1|H, 1|N, N) (ToMe's size bias) or None. The
    extras are always returned; under jit XLA drops those the caller ignores.
    probe: (H, D/H) a query per head (a MAP head's probe) whose attention row to return too.
    """
    return self._attend(x, bias=bias, extras=True, probe=probe)

  def attend_matrix(self, x, bias=None, policy=None,
                    probe=None) -> tuple[jax.Array, AttentionOut]:
    """`attend` that forms the whole attention matrix, whatever the implementation, and also
    returns each token's attention received (its column means) and the matrix itself
    (B, H, N, N); under a `policy` (B, N) (no mean-query row then) its softmax ignores the
    dropped keys (ops.policy_softmax)."""
    return self._attend(x, bias=bias, policy=policy, extras=True, matrix=True, probe=probe)

  def attention_probs(self, x, bias=None) -> jax.Array:
    """The softmax attention of LN(x) alone: (B, N, D) -> (B, H, N, N) float32 (MCTF's
    one step ahead looks at it before merging)."""
    return self.MultiHeadDotProductAttention_0(self.LayerNorm_0(x), bias=bias,
                                               probs_only=True)[1].probs

  def attend_ahead(self, x, probs, value_index, base, src, dst, weights) -> jax.Array:
    """First half on merged tokens with the attention of the tokens before the merge:
    x (B, N', D), probs (B, H, N, N), value_index (B, N) in [0, N'), the merge's plan (base,
    src, dst) and pooling weights (B, N) -> (B, N', D) (see MultiHeadDotProductAttention's
    `given`)."""
    y, _ = self.MultiHeadDotProductAttention_0(
        self.LayerNorm_0(x), given=(probs, value_index, ops.MergePlan(base, src, dst), weights))
    return x + self._branch(y, None)

  def feed(self, x) -> jax.Array:
    """Second half: (B, N', D) -> (B, N', D); N' may be smaller than in `attend`."""
    return self._feed(x)

  def __call__(self, x, policy=None, rate=None, bias=None):
    """The whole block; policy (B, N) 0/1 masks attention to dropped tokens (dTPS training);
    bias (B, 1|H, 1|N, N) is added to the attention logits (ToMe's size bias) or None.

    rate: this block's stochastic-depth rate as an array (scanned blocks), else `drop_path`.
    """
    x, _ = self._attend(x, rate=rate, policy=policy, bias=bias)
    return self._feed(x, rate=rate)


# The block's functions (tps_jax.methods.Block offers them to the reduction methods), which
# `nn.remat(Encoder1DBlock, methods=BLOCK_FUNCTIONS)` rematerialises: every way the encoder runs
# a block, whole or in halves around a reduction.
BLOCK_FUNCTIONS = ("__call__", "attend", "attend_matrix", "attention_probs", "attend_ahead",
                   "feed")
