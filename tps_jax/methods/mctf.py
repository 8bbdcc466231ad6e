"""MCTF (Lee et al., CVPR 2024): in each activated block, fuse `r` tokens by bipartite matching
weighted by similarity, informativeness (attention received) and size, one step ahead of the
attention, with proportional attention after. docs/method.md, section 6."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods.base import attention_macs, check_keys, mlp_macs, size_bias
from tps_jax.methods.merging import PerBlockMerge
from tps_jax.methods.registry import register

ONE_STEP_AHEAD = (0, 1, 2)  # merge after the block / before its attention / before, recomputed


@dataclasses.dataclass(frozen=True)
class MCTFOptions:
  """Defaults as the authors' DeiT runs (`--mctf_type [16,0,0,1,1,1,20,40,1,1,0]`).

  Attributes:
    r: tokens fused in each block (length depth).
    tau_sim, tau_info, tau_size: temperatures of the similarity, informativeness and size
      criteria (0 drops one).
    bidirection: bidirectional matching.
    one_step_ahead: 0 merges after the block with its attention; 1 merges before the
      attention, whose matrix is merged rather than recomputed; 2 merges before and recomputes.
    pooling: how fused tokens are averaged ("attn", "size", "mean"; ops.mctf.POOLINGS).
    prop_attn: proportional attention (log size added to the logits) after a merge.
  """
  r: tuple[int, ...] = ()
  tau_sim: float = 1.0
  tau_info: float = 20.0
  tau_size: float = 40.0
  bidirection: bool = True
  one_step_ahead: int = 1
  pooling: str = "attn"
  prop_attn: bool = True


_SETTINGS = tuple(f.name for f in dataclasses.fields(MCTFOptions) if f.name != "r")


@register("mctf")
class MCTF(PerBlockMerge):
  Options = MCTFOptions

  def _after(self, o):
    return o.one_step_ahead == 0

  def options(self, spec, geo):
    """`r` (a count, a fraction < 1 of the reducible tokens, or a per-block list) in each of
    `locations` (default 1..depth-1), by the authors' arithmetic: at least 10 tokens stay, at
    most half the reducible ones merge; and the settings of MCTFOptions."""
    check_keys(self.name, spec, ("r", "locations", *_SETTINGS))
    depth = geo.depth
    r = spec.get("r", 16)
    if isinstance(r, (list, tuple)):
      if len(r) != depth:
        raise ValueError(f"mctf r lists {len(r)} values for a model of depth {depth}.")
      if "locations" in spec:
        raise ValueError("mctf takes a per-block r list or locations, not both.")
      wanted = [float(v) for v in r]
    else:
      if not (isinstance(r, (int, float)) and r >= 0) or isinstance(r, bool):
        raise ValueError(f"mctf r must be a count >= 0 or a fraction in (0, 1), got {r!r}.")
      locations = tuple(int(l) for l in spec.get("locations", range(1, depth)))
      bad = [l for l in locations if not 0 <= l < depth]
      if bad:
        raise ValueError(f"mctf locations {bad} are outside the model's blocks [0, {depth - 1}].")
      wanted = [float(r) if i in locations else 0.0 for i in range(depth)]
    if any(v < 0 or (v >= 1 and v != int(v)) for v in wanted):
      raise ValueError(f"mctf r must be counts or fractions in (0, 1), got {r!r}.")
    o = MCTFOptions(**{k: spec[k] for k in _SETTINGS if k in spec})
    for name in ("tau_sim", "tau_info", "tau_size"):
      v = getattr(o, name)
      if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        raise ValueError(f"mctf {name} must be a number >= 0 (0 drops the criterion), got {v!r}.")
    if o.one_step_ahead not in ONE_STEP_AHEAD:
      raise ValueError(f"mctf one_step_ahead must be one of {ONE_STEP_AHEAD}, got "
                       f"{o.one_step_ahead!r}.")
    if o.pooling not in ops.mctf.POOLINGS:
      raise ValueError(f"unknown mctf pooling {o.pooling!r}; expected one of "
                       f"{ops.mctf.POOLINGS} (the authors' max pooling is not offered).")
    p, out, t = geo.prefix, [], geo.num_patches + geo.prefix
    for v in wanted:
      if v == 0:
        out.append(0)
        continue
      if t - v < 10:  # the authors' arithmetic (utils/mctf.py), before the fraction
        v = t - 10
      n = max(min(int((t - p) * v) if v < 1 else int(v), (t - p) // 2), 0)
      out.append(n)
      t -= n
    return dataclasses.replace(o, r=tuple(out), tau_sim=float(o.tau_sim),
                               tau_info=float(o.tau_info), tau_size=float(o.tau_size),
                               bidirection=bool(o.bidirection), prop_attn=bool(o.prop_attn))

  def plain_bias(self, o, state):
    return size_bias(state) if o.prop_attn else None

  def block(self, o, i, block, state, ctx):
    r, p = o.r[i], ctx.prefix
    bias = size_bias(state) if o.prop_attn else None

    def merge(metric, y, size, probs):
      received = jnp.mean(probs, axis=(1, 2))  # (B, T) attention received
      new_index = ops.mctf_match(metric, received, size, r, tau_sim=o.tau_sim,
                                 tau_info=o.tau_info, tau_size=o.tau_size,
                                 bidirection=o.bidirection, protected=p)
      weights = ops.pooling_weights(received, size, o.pooling, received.shape)
      y, size, plan = ops.mctf_merge(y, size, weights, new_index, y.shape[1] - r)
      return y, size, new_index, (plan, weights)

    x, size = state.x, state.size
    if o.one_step_ahead == 0:  # the block with its attention, then the merge
      y, info = block.attend_matrix(x, bias=bias)
      y = block.feed(y)
      y, size, new_index, _ = ctx.checkpoint(merge)(y, y, size, info.probs)
      return state.after_merge(y, size, new_index)
    probs = block.attention_probs(x, bias=bias)
    if o.one_step_ahead == 2:  # the authors compute this look-ahead without gradient
      probs = jax.lax.stop_gradient(probs)
    y, size, new_index, (plan, weights) = ctx.checkpoint(merge)(x, x, size, probs)
    state = state.after_merge(y, size, new_index)
    if o.one_step_ahead == 1:
      y = block.attend_ahead(y, probs, new_index, plan, weights)
    else:
      y, _ = block.attend(y, bias=size_bias(state) if o.prop_attn else None)
    return state.replace(x=block.feed(y))

  def block_macs(self, o, i, tokens_attn, tokens_mlp, dims):
    r, t, d = o.r[i], tokens_attn, dims.width
    if not r:
      return super().block_macs(o, i, tokens_attn, tokens_mlp, dims)
    t2 = t - r
    if o.one_step_ahead == 1:  # q, k and the attention on T; v, out on T - r; the rows' merge
      return (2 * t * d * d + 2 * t * t * d + 2 * t2 * d * d + r * t2 * (d + 1)
              + mlp_macs(t2, d, dims.mlp_dim))
    if o.one_step_ahead == 2:  # the look-ahead's q, k and logits on T, then a block on T - r
      return 2 * t * d * d + t * t * d + attention_macs(t2, d) + mlp_macs(t2, d, dims.mlp_dim)
    return attention_macs(t, d) + mlp_macs(t, d, dims.mlp_dim)  # the merge after the MLP

  def extra_macs(self, o, geo, dims):
    # the tokens' cosine similarities (width D), then (ops.mctf_merge) gathers and (r, T - r)
    # one-hot products: the weighted tokens with their weights, and the sizes
    reduction, t, d = 0, geo.num_patches + geo.prefix, dims.width
    for r in o.r:
      if r:
        t2 = t - r
        reduction += ((t + 1) // 2) * (t // 2) * d + r * t2 * (d + 1) + 2 * r * t2
        t = t2
    return {"reduction": reduction}

  def spec(self, *, keep_ratio=0.7, locations=None, r=16):
    return {"method": self.name, "r": r}

  def example(self, geo):  # the authors' DeiT-S r = 16 of 196 patches in blocks 1..11, scaled
    return {"method": self.name, "r": max(1, round(16 * geo.num_patches / 196))}

  def identity(self, geo):
    return {"method": self.name, "r": 0}
