"""DiffRate (Chen et al., ICCV 2023): at each block of its schedule, after the (size-biased)
attention, sort the tokens by cls attention, prune to `prune_kept`, then merge those beyond the
best `merge_kept` into their most similar kept token. The schedule comes from a differentiable
search (`tps_jax.trainer.rate_search`). docs/method.md, section 7."""

from __future__ import annotations

import dataclasses
import functools
import math


from tps_jax import ops
from tps_jax.methods import stages
from tps_jax.methods.base import Method, check_keys, size_bias
from tps_jax.methods.registry import register
from tps_jax.methods.staged import (attend_for, attention_scores, default_locations,
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
