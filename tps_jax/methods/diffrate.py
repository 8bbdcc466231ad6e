"""DiffRate (Chen et al., ICCV 2023): at each block of its schedule, after the (size-biased)
attention, sort the tokens by cls attention, prune to `prune_kept`, then merge those beyond the
best `merge_kept` into their most similar kept token. The schedule comes from a differentiable
search (`tps_jax.trainer.rate_search`). docs/method.md, section 7."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods import stages
from tps_jax.methods.base import Method, check_keys, size_bias
from tps_jax.methods.registry import register
from tps_jax.methods.scored import (attend_for, attention_scores, default_locations,
                                    resolve_score)

# The authors' searched DeiT-S 2.7 GFLOPs schedule (OpenGVLab/DiffRate@91ae3e3,
# compression_rate.json; their counts include cls), 2.72 GMACs by our count.
DEIT_S_2_7 = {
    "prune_kept": [c - 1 for c in (197, 196, 182, 160, 141, 127, 115, 105, 88, 66, 49, 3)],
    "merge_kept": [c - 1 for c in (197, 188, 170, 147, 131, 119, 109, 96, 76, 54, 45, 3)]}


@dataclasses.dataclass(frozen=True)
class DiffRateOptions:
  """Attributes:
    locations: the blocks where tokens are pruned or merged (counts below the tokens left).
    prune_counts: patch tokens kept by pruning at each location.
    keep_counts: patch tokens left after merging at each location.
    score: the attention score ("cls", "received", "mean_query", "map_probe").
  """
  locations: tuple[int, ...] = ()
  prune_counts: tuple[int, ...] = ()
  keep_counts: tuple[int, ...] = ()
  score: str = "cls"


def schedule(o: DiffRateOptions, depth: int, num_patches: int) -> dict[str, tuple[int, ...]]:
  """A plan's per-block prune_kept / merge_kept lists (the effective counts)."""
  at = dict(zip(o.locations, zip(o.prune_counts, o.keep_counts)))
  prune, merge, n = [], [], num_patches
  for i in range(depth):
    a, b = at.get(i, (n, n))
    prune.append(a); merge.append(b)
    n = b
  return {"prune_kept": tuple(prune), "merge_kept": tuple(merge)}


@register("diffrate")
class DiffRate(Method):
  Options = DiffRateOptions
  tracks_sizes = True

  def options(self, spec, geo):
    """Per-block `prune_kept` and `merge_kept` lists of patch tokens (cls excluded; the
    authors count it); counts above the tokens left change nothing."""
    check_keys(self.name, spec, ("prune_kept", "merge_kept", "score"))
    score = resolve_score(spec.get("score", "auto"), geo.has_cls, geo.has_probe)
    lists = {}
    for key in ("prune_kept", "merge_kept"):
      v = spec.get(key)
      if v is None:
        raise ValueError(f"diffrate needs {key}: one count per block ({geo.depth}).")
      v = tuple(int(c) for c in v)
      if len(v) != geo.depth:
        raise ValueError(f"diffrate {key} lists {len(v)} counts for a model of depth "
                         f"{geo.depth}.")
      if any(c < 1 for c in v):
        raise ValueError(f"diffrate {key} counts must be >= 1, got {v}.")
      lists[key] = v
    locations, prune_counts, keep_counts, n = [], [], [], geo.num_patches
    for i, (p, m) in enumerate(zip(lists["prune_kept"], lists["merge_kept"])):
      a = min(n, p)
      b = min(a, m)
      if b < n:
        locations.append(i); prune_counts.append(a); keep_counts.append(b)
        n = b
    return DiffRateOptions(tuple(locations), tuple(prune_counts), tuple(keep_counts), score)

  def revalidate(self, o, geo, spec):
    n = len(o.locations)
    if len(o.prune_counts) != n or len(o.keep_counts) != n:
      raise ValueError(f"this diffrate plan has {n} locations, {len(o.prune_counts)} prune "
                       f"counts and {len(o.keep_counts)} keep counts.")
    if o.locations and max(o.locations) >= geo.depth:
      raise ValueError(f"this diffrate plan reduces at block {max(o.locations)}, the model "
                       f"has {geo.depth} blocks.")
    if o.prune_counts and max(o.prune_counts) > geo.num_patches:
      raise ValueError(f"this diffrate plan keeps {max(o.prune_counts)} patches, the model "
                       f"has {geo.num_patches}.")
    return self.options({**schedule(o, geo.depth, geo.num_patches), "score": o.score}, geo)

  def acts_at(self, o, i):
    return i in o.locations

  def uses_probe(self, o):
    return o.score == "map_probe"

  def tokens(self, o, geo):
    out, n, at = [], geo.num_patches, dict(zip(o.locations, o.keep_counts))
    for i in range(geo.depth):
      before = n
      n = at.get(i, n)
      out.append((before, n, n))
    return tuple(out)

  def plain_bias(self, o, state):
    return size_bias(state)

  def block(self, o, i, block, state, ctx):
    s = o.locations.index(i)
    y, info = attend_for(block, o.score, ctx)(
        state.x, bias=ops.proportional_attention_bias(state.size))
    st = ctx.checkpoint(functools.partial(
        stages.prune_then_merge, prune_k=o.prune_counts[s], merge_k=o.keep_counts[s],
        num_patches=ctx.num_patches, prefix=ctx.prefix, ordered=ctx.ordered))(
            y, attention_scores(info, o.score, ctx.prefix), state.positions, size=state.size)
    state = state.after_stage(st, ctx)
    return state.replace(x=block.feed(state.x))

  def extra_macs(self, o, geo, dims):
    # the score row; each of the kp - km merged tokens against the km + p kept (similarity,
    # then the one-hot merge of the tokens and of the sizes)
    reduction, n, p, d = 0, geo.num_patches, geo.prefix, dims.width
    for kp, km in zip(o.prune_counts, o.keep_counts):
      reduction += (n + p) * d + 2 * (kp - km) * (km + p) * d + (kp - km) * (km + p)
      n = km
    return {"reduction": reduction}

  def keep_ratios(self, o):
    return ()

  def stage_blocks(self, o):
    return o.locations

  def summary(self, o):
    return {"keep_counts": list(o.keep_counts), "prune_counts": list(o.prune_counts)}

  def spec(self, **_):
    raise ValueError("diffrate runs a per-block schedule: give {'method': 'diffrate', "
                     "'prune_kept': [...], 'merge_kept': [...]} (e.g. from "
                     "tps_jax.trainer.rate_search.search).")

  def example(self, geo):
    """The authors' DeiT-S 2.7 GFLOPs schedule at 12 blocks (scaled to the patches); elsewhere
    pruning to 85% and merging to 70% of the tokens left at the default locations."""
    n = geo.num_patches
    if geo.depth == 12:
      scale = lambda c: max(1, min(n, round(c * n / 196)))
      return {"method": self.name, **{k: [scale(c) for c in v] for k, v in DEIT_S_2_7.items()}}
    prune, merge, left = [n] * geo.depth, [n] * geo.depth, n
    for i in default_locations(geo.depth):
      prune[i] = max(1, math.ceil(0.85 * left))
      merge[i] = left = max(1, math.ceil(0.7 * left))
    return {"method": self.name, "prune_kept": prune, "merge_kept": merge}

  def identity(self, geo):
    return {"method": self.name, "prune_kept": [geo.num_patches] * geo.depth,
            "merge_kept": [geo.num_patches] * geo.depth}


class RateLogits(nn.Module):
  """One block's search parameters: logits over its candidate kept counts, for pruning and for
  merging (zeros: uniform, as the authors start)."""
  num_candidates: int

  @nn.compact
  def __call__(self):
    zeros = lambda _, shape: jnp.zeros(shape, jnp.float32)
    return (self.param("prune", zeros, (self.num_candidates,)),
            self.param("merge", zeros, (self.num_candidates,)))


def _search_stage(i, x, cls_attn, size, mask, live, positions, prune_logits, merge_logits):
  """Block i's sort, differentiable prune mask and in-place merge of the search forward."""
  b, t, _ = x.shape
  cands = ops.diffrate.rate_candidates(t - 1, i)
  order = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                           1 + jnp.argsort(-jax.lax.stop_gradient(cls_attn), axis=1,
                                           stable=True).astype(jnp.int32)], axis=1)
  take = lambda a: jnp.take_along_axis(a, order.reshape(order.shape + (1,) * (a.ndim - 2)),
                                       axis=1)
  x, size, mask = take(x), take(size), take(mask)
  positions = jnp.take_along_axis(positions, order[:, 1:] - 1, axis=1)
  prune_kept = ops.diffrate.kept_number(prune_logits, cands)
  pm = ops.diffrate.token_mask(prune_logits, cands, prune_kept, live, t)
  mask = jnp.where(prune_kept < live, mask * pm[None], mask)
  mid = jnp.minimum(live, jnp.floor(prune_kept))
  merge_kept = ops.diffrate.kept_number(merge_logits, cands)
  mm = ops.diffrate.token_mask(merge_logits, cands, merge_kept, mid, t)
  do_merge = merge_kept < mid
  j = jnp.arange(t, dtype=jnp.float32)
  is_dst = j < jnp.floor(merge_kept)
  is_src = (j >= jnp.floor(merge_kept)) & (j < mid) & do_merge
  metric = jax.lax.stop_gradient(x)
  metric = metric / jnp.linalg.norm(metric, axis=-1, keepdims=True)
  sim = jnp.einsum("bsc,bdc->bsd", metric, metric)
  sim = jnp.where(is_dst[None, None, :] & (j[None, None, :] > 0), sim, -jnp.inf)
  node_max = jnp.max(sim, axis=-1)
  onehot = jax.nn.one_hot(jnp.argmax(sim, axis=-1), t) * is_src[None, :, None]  # (B, S, D)
  count = 1.0 + jnp.sum(onehot, axis=1)
  merged = (x + jnp.einsum("bsd,bsc->bdc", onehot, x)) / count[..., None]
  x = jnp.where(is_dst[None, :, None] & do_merge, merged, x)
  src_size = jnp.where(is_src[None], jnp.maximum(size * node_max, 1.0), size)
  src_size = jax.lax.stop_gradient(jnp.where(is_dst[None], size + jnp.einsum(
      "bsd,bs->bd", onehot, jnp.where(is_src[None], src_size, 0.0)), src_size))
  size = jnp.where(do_merge, src_size, size)
  mask = jnp.where(do_merge, mask * mm[None], mask)
  live = jnp.where(do_merge, jnp.floor(merge_kept), mid)
  return x, size, mask, live, positions, jnp.stack([prune_kept, merge_kept])


@dataclasses.dataclass(frozen=True)
class SearchOptions:
  pass


@register("diffrate_search")
class DiffRateSearch(Method):
  """DiffRate's search forward (docs/method.md, section 7): every block, after its attention
  under the mask and the size bias, sorts the tokens by cls attention, masks those beyond a
  differentiable pruning count and merges those beyond a merging count into their most similar
  kept token, in place. Every token stays in the sequence (masked), so the shapes do not
  change; the block's distributions are its parameters (`Transformer/rate_{i}`: "prune",
  "merge"). `out["carry"]["kept"]` (depth, 2) holds the straight-through kept counts (cls
  included) that the MACs proxy and the schedule read (`tps_jax.trainer.rate_search`)."""
  Options = SearchOptions
  tracks_sizes = True
  reduces = False  # it masks, and the shapes stay those of the dense model

  def options(self, spec, geo):
    check_keys(self.name, spec, ())
    if not geo.has_cls:
      raise ValueError("DiffRate's search scores tokens by cls attention: the model needs a "
                       "cls token (pool_type 'tok').")
    if geo.prefix != 1:
      raise ValueError(f"DiffRate's search (the authors') protects cls alone; this model has "
                       f"{geo.prefix} protected tokens (registers): search on a model without "
                       f"them.")
    return SearchOptions()

  def acts_at(self, o, i):
    return True

  def block(self, o, i, block, state, ctx):
    x, size = state.x, state.size
    b, t, _ = x.shape
    carry = state.carry or {"mask": jnp.ones((b, t), jnp.float32),
                            "live": jnp.asarray(t, jnp.float32), "kept": ()}
    mask, live = carry["mask"], carry["live"]
    candidates = ops.diffrate.rate_candidates(t - 1, i).shape[0]
    prune_logits, merge_logits = ctx.module(RateLogits, num_candidates=candidates,
                                            name=f"rate_{i}")()
    x, info = block.attend_matrix(x, bias=ops.proportional_attention_bias(size), policy=mask)
    cls_attn = jnp.mean(info.probs[:, :, 0, 1:], axis=1)
    x, size, mask, live, positions, kept = ctx.checkpoint(functools.partial(_search_stage, i))(
        x, cls_attn, size, mask, live, state.positions, prune_logits, merge_logits)
    carry = {"mask": mask, "live": live, "kept": carry["kept"] + (kept,)}
    return state.replace(x=block.feed(x), size=size, positions=positions, carry=carry,
                         merged=True)

  def example(self, geo):
    return {"method": self.name}

  identity = example
