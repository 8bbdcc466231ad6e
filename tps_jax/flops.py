"""Multiply-accumulates of a ViT at inference, as the papers count them (docs/method.md, section 8).

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

import functools
import math
from typing import Any

import jax
from jax.extend import core as jex_core
import jax.numpy as jnp

from tps_jax import methods
from tps_jax.models.vit import VisionTransformer


def breakdown(model: VisionTransformer) -> dict[str, int]:
  """MACs of one image through `model` at inference, by part.

  The blocks are counted at the token counts they run on (`VisionTransformer.tokens`: as the
  method declares them, or read from a trace), each by `Method.block_macs` (the dense block's
  count unless the method changes the block's arithmetic); the method adds its own work
  (`Method.extra_macs`: score heads, matching, merging). A method that counts neither its own
  work nor its blocks' has that read from its traced program: "reduction" is then what its
  matrix products add to the dense blocks at its token counts (`matmul_macs`).

  Args:
    model: a VisionTransformer built with an image_size.
  Returns:
    {"embedding", "blocks", "score_heads", "reduction", "pool", "head"}: MACs of each part.
  """
  d, m = model.width, model.mlp_dim
  red = model.plan()
  method, opts = red.impl, red.options
  dims = model.dims
  ph, pw = ((model.patch_size,) * 2 if isinstance(model.patch_size, int)
            else tuple(model.patch_size))
  out_d = (d if model.rep_size is True else int(model.rep_size)) if model.rep_size else d
  parts = {"embedding": model.num_patches * ph * pw * model.channels * d, "blocks": 0,
           "score_heads": 0, "reduction": 0, "pool": 0,
           "head": (d * out_d if model.rep_size else 0) + out_d * (model.num_classes or 0)}
  tokens = model.tokens()
  for i, (n_attn, n_mlp, _) in enumerate(tokens):
    parts["blocks"] += method.block_macs(opts, i, n_attn, n_mlp, dims)
  for part, v in method.extra_macs(opts, red.geometry, dims).items():
    parts[part] += v
  if red.uses_probe:  # the MAP head's probe query, projected once for the stages' score rows
    parts["reduction"] += d * d
  if model.pool_type == "map":  # one probe query to the t final tokens, then its MLP
    t = tokens[-1][2]
    parts["pool"] = 2 * d * d + 2 * t * d * d + 2 * t * d + 2 * d * m
  if not any(methods.declares(method, h) for h in ("extra_macs", "block_macs")):
    parts["reduction"] = _traced(model) - sum(parts.values())
  return parts


@functools.lru_cache(maxsize=256)
def _traced(model: VisionTransformer) -> int:
  return matmul_macs(model)


def _image_shape(model: VisionTransformer) -> tuple[int, int, int, int]:
  if model.image_size is None:
    raise ValueError("counting MACs needs a model built with an image_size.")
  h, w = ((model.image_size,) * 2 if isinstance(model.image_size, int)
          else tuple(model.image_size))
  return (1, h, w, model.channels)


def macs(model: VisionTransformer) -> int:
  """Total multiply-accumulates of one image at inference.

  Args:
    model: a VisionTransformer built with an image_size (any method).
  Returns:
    The MACs as an int (`breakdown` gives them by part).
  """
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
    times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if isinstance(sub, jex_core.ClosedJaxpr):
          total += times * _jaxpr_macs(sub.jaxpr)
        elif isinstance(sub, jex_core.Jaxpr):
          total += times * _jaxpr_macs(sub)
  return total


def matmul_macs(model: VisionTransformer, params: Any = None) -> int:
  """MACs of the matrix products and convolutions of one image's inference, from the jaxpr."""
  image = jnp.zeros(_image_shape(model), jnp.float32)
  if params is None:
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), image))
  jaxpr = jax.make_jaxpr(lambda p, x: model.apply(p, x, train=False)[0])(params, image)
  return _jaxpr_macs(jaxpr.jaxpr)
