"""Multiply-accumulates of a ViT at inference, as the papers count them (SPEC section 5).

A block over N tokens of width D with MLP width M costs `4 N D^2 + 2 N^2 D`
(attention) + `2 N D M` (MLP), i.e. `12 N D^2 + 2 N^2 D` for M = 4D. Stages add
their score head (`~1.6 N D^2`), squeeze (`2 Np Nr D`: similarity and fusion)
or merge. An intra-block stage (eTPS, EViT, top-k, ToMe) runs the attention on
the tokens before it and the MLP on the tokens after it.

  flops.macs(model)          -> total MACs of one image
  flops.breakdown(model)     -> per-part dict
  flops.xla_macs(model)      -> XLA's count for the jitted inference function
  flops.matmul_macs(model)   -> MACs of every matmul / convolution in the traced program

`matmul_macs` counts exactly what the analytic formulas model (matrix
products), so the two agree closely; `xla_macs` also counts elementwise work
(softmax, GELU, LayerNorm), about 5% more for DeiT.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from tps_jax.models.vit import VisionTransformer


def _attention(n: int, d: int) -> int:
  return 4 * n * d * d + 2 * n * n * d


def _mlp(n: int, d: int, m: int) -> int:
  return 2 * n * d * m


def _score_head(n: int, d: int) -> int:
  return n * (d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2)


def breakdown(model: VisionTransformer) -> dict[str, int]:
  """MACs of one image through `model` at inference, by part."""
  d, m = model.width, model.mlp_dim
  red = model.plan()
  n0 = model.num_patches
  p = model.num_prefix  # protected tokens (cls, pool "0"'s readout) beside the reducible ones
  ph, pw = ((model.patch_size,) * 2 if isinstance(model.patch_size, int)
            else tuple(model.patch_size))
  rep = 0
  if model.rep_size:
    rep = d * (d if model.rep_size is True else int(model.rep_size))
  out_d = (d if model.rep_size is True else int(model.rep_size)) if model.rep_size else d
  parts = {"embedding": n0 * ph * pw * model.channels * d, "blocks": 0,
           "score_heads": 0, "reduction": 0, "pool": 0,
           "head": rep + out_d * (model.num_classes or 0)}
  n = model.num_reducible  # current reducible tokens
  stage_at = red.stage_at
  for i in range(model.depth):
    s = stage_at.get(i)
    if s is not None and red.learned:
      parts["score_heads"] += _score_head(n, d)
      k = red.keep_counts[s]
      if red.squeezes:
        parts["reduction"] += 2 * (n - k) * k * d
      n = k
    n_attn = n
    if s is not None and red.method == "diffrate":
      kp, km = red.prune_counts[s], red.keep_counts[s]
      # the score row; each of the kp - km merged tokens against the km + p kept (similarity,
      # then the one-hot merge of the tokens and of the sizes)
      parts["reduction"] += (n + p) * d + 2 * (kp - km) * (km + p) * d + (kp - km) * (km + p)
      n = km
    elif s is not None and red.intra_block:
      k = red.keep_counts[s]
      # the score row (cls or mean query); "received" is the attention matrix's column means
      parts["reduction"] += (n + p) * d
      if red.method == "etps":
        parts["reduction"] += 2 * (n - k) * k * d
      elif red.method == "evit":
        parts["reduction"] += (n - k) * d
        k += 1
      n = k
    elif red.tome_r and red.tome_r[i] and red.method == "pitome":
      # cosine similarities of the T patch tokens' keys (head dim), then the merge as this
      # library runs it (ops.planned_merge): gathers and an (r, T - r) one-hot product of the
      # size-weighted tokens and the sizes
      r, t = red.tome_r[i], n
      parts["reduction"] += t * t * (d // model.num_heads) + r * (t - r) * (d + 1)
      n -= r
    elif red.tome_r and red.tome_r[i] and red.method == "mctf":
      # the tokens' cosine similarities (width D), then (ops.mctf_merge) gathers and (r, T - r)
      # one-hot products: the weighted tokens with their weights, and the sizes
      r, t = red.tome_r[i], n + p
      t2 = t - r
      parts["reduction"] += ((t + 1) // 2) * (t // 2) * d + r * t2 * (d + 1) + 2 * r * t2
      osa = red.mctf.one_step_ahead
      if osa == 1:  # q, k and the attention on T; v, out on T - r; the rows' merge (T -> T - r)
        parts["blocks"] += 2 * t * d * d + 2 * t * t * d + 2 * t2 * d * d + r * t2 * (d + 1)
      elif osa == 2:  # the look-ahead's q, k and logits on T, then a whole block on T - r
        parts["blocks"] += 2 * t * d * d + t * t * d + _attention(t2, d)
      else:  # a whole block on T, the merge after its MLP
        parts["blocks"] += _attention(t, d) + _mlp(t, d, m)
      parts["blocks"] += _mlp(t2, d, m) if osa else 0
      n -= r
      continue
    elif red.tome_r and red.tome_r[i]:
      r, t = red.tome_r[i], n + p
      na, nb = (t + 1) // 2, t // 2
      parts["reduction"] += na * nb * (d // model.num_heads) + r * nb * (d + 1)
      n -= r
    parts["blocks"] += _attention(n_attn + p, d) + _mlp(n + p, d, m)
  if model.pool_type == "map":  # one probe query to the t final tokens, then its MLP
    t = n + p
    parts["pool"] = 2 * d * d + 2 * t * d * d + 2 * t * d + 2 * d * m
  return parts


def _image_shape(model: VisionTransformer) -> tuple[int, int, int, int]:
  if model.image_size is None:
    raise ValueError("counting MACs needs a model built with an image_size.")
  h, w = ((model.image_size,) * 2 if isinstance(model.image_size, int)
          else tuple(model.image_size))
  return (1, h, w, model.channels)


def macs(model: VisionTransformer) -> int:
  """Total multiply-accumulates of one image at inference."""
  return sum(breakdown(model).values())


def xla_macs(model: VisionTransformer, params: Any = None, *, optimized: bool = True) -> float:
  """Half of XLA's flop count for the jitted inference of one image (elementwise ops included).

  optimized: count the compiled program (after XLA's optimisations); False counts the lowered
  program without compiling it (within 1.1% of the compiled count on the Fashion-MNIST ViT
  with every method, and seconds faster on a CPU).
  """
  image = jax.ShapeDtypeStruct(_image_shape(model), jnp.float32)
  if params is None:
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image.shape)))
  fn = jax.jit(lambda p, x: model.apply(p, x, train=False)[0])
  lowered = fn.lower(params, image)
  cost = (lowered.compile() if optimized else lowered).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"]) / 2.0


def _eqn_macs(eqn) -> int:
  if eqn.primitive.name == "dot_general":
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return math.prod(out) * math.prod(lhs[i] for i in contract)
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape  # kernel; per output value: its size / out features
    out = eqn.outvars[0].aval.shape
    out_features = rhs[eqn.params["dimension_numbers"].rhs_spec[0]]
    return math.prod(out) * math.prod(rhs) // out_features
  return 0


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += _jaxpr_macs(sub)
  return total


def matmul_macs(model: VisionTransformer, params: Any = None) -> int:
  """MACs of the matrix products and convolutions of one image's inference, from the jaxpr."""
  image = jnp.zeros(_image_shape(model), jnp.float32)
  if params is None:
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), image))
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, x, train=False)[0])(params, image)
  return _jaxpr_macs(jaxpr.jaxpr)
