"""Methods that score the tokens and keep the best at a few blocks ("stages").

Two families share the options (`StagedOptions`: locations and keep counts):
- `LearnedStage`: a score head between blocks scores the tokens before block `loc` (dTPS,
  DynamicViT). In training the decisions are straight-through Gumbel samples over a fixed-shape
  sequence (masked attention); at inference the kept tokens are gathered.
- `AttentionStage`: block `loc`'s own attention scores the tokens, after its attention and
  before its MLP (eTPS, EViT, top-k).

What happens to the pruned tokens is the method's (`prune`: "squeeze", "fuse" or "drop").
docs/method.md, sections 1-3.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods import stages
from tps_jax.methods.base import (Block, Context, Dims, Geometry, Method, TokenState, check_keys,
                                  readout_kept, score_head_macs)

DEFAULT_LOCATIONS = (3, 6, 9)
# How an attention stage scores tokens: "cls", the attention from the cls token (the papers');
# for models without one "received", the attention each token receives (averaged over queries
# and heads), "mean_query", the attention from the mean query, or on a MAP model "map_probe",
# the attention from the MAP head's probe query to the stage block's keys. "auto": cls where
# there is a cls token, else CLS_FREE_SCORE (MAP_SCORE on MAP models).
SCORES = ("auto", "cls", "received", "mean_query", "map_probe")
# Both "received": it scored best on the GAP and the MAP teachers (docs/results.md).
CLS_FREE_SCORE = "received"
MAP_SCORE = "received"
_SCORE_FIELD = {"cls": "cls_attn", "received": "received", "mean_query": "mean_query",
                "map_probe": "probe"}


def default_locations(depth: int) -> tuple[int, ...]:
  """The papers' blocks 3, 6, 9 of 12, scaled to `depth`."""
  return tuple(sorted({max(0, min(depth - 1, depth * q // 4)) for q in (1, 2, 3)}))


def resolve_score(score: str, has_cls: bool, has_probe: bool = False) -> str:
  """The score an attention stage uses ("auto" resolved; "cls" refused without a cls token,
  "map_probe" without a MAP head)."""
  if score not in SCORES:
    raise ValueError(f"unknown reduction score {score!r}; expected one of {SCORES}.")
  if score == "auto":
    return "cls" if has_cls else MAP_SCORE if has_probe else CLS_FREE_SCORE
  if score == "cls" and not has_cls:
    raise ValueError("reduction score 'cls' needs a cls token (pool_type 'tok'); use "
                     "'received' or 'mean_query' (or 'auto') for this model.")
  if score == "map_probe" and not has_probe:
    raise ValueError("reduction score 'map_probe' needs a MAP head (pool_type 'map'); use "
                     "'received' or 'mean_query' (or 'auto') for this model.")
  return score


def attention_scores(info, score: str, prefix: int):
  """(B, N) the stage's score of each reducible token from one attention call's extras."""
  return jnp.mean(getattr(info, _SCORE_FIELD[score])[:, :, prefix:], axis=1)


def attend_for(block: Block, score: str, ctx: Context):
  """The block function that gives `score`: the whole matrix only for "received"; the MAP
  head's probe query handed in for "map_probe"."""
  attend = block.attend_matrix if score == "received" else block.attend
  return functools.partial(attend, probe=ctx.probe) if score == "map_probe" else attend


def check_temperature(spec) -> float:
  t = float(spec.get("temperature", 1.0))
  if not t > 0:
    raise ValueError(f"reduction temperature must be > 0, got {t}.")
  return t


def check_locations(name: str, locations, depth: int) -> tuple[int, ...]:
  locations = tuple(int(l) for l in locations)
  if not locations:
    raise ValueError(f"reduction method {name!r} needs at least one location.")
  if list(locations) != sorted(set(locations)):
    raise ValueError(f"reduction locations must be strictly increasing, got {locations}.")
  bad = [l for l in locations if not 0 <= l < depth]
  if bad:
    raise ValueError(f"reduction locations {bad} are outside the model's blocks "
                     f"[0, {depth - 1}] (depth={depth}).")
  return locations


@dataclasses.dataclass(frozen=True)
class StagedOptions:
  """Attributes:
    locations: the stage blocks (learned: the stage runs before that block; attention: inside).
    keep_counts: reducible tokens kept after each stage.
    keep_ratios: the ratio each stage aims at (the keep-ratio loss's rho_s): rho ** (s + 1)
      for a scalar keep_ratio, the list as given, or keep_counts / num_patches.
    temperature: of the squeeze similarity (docs/method.md, section 1).
    score: the attention score of an attention stage ("cls", "received", "mean_query",
      "map_probe").
  """
  locations: tuple[int, ...] = DEFAULT_LOCATIONS
  keep_counts: tuple[int, ...] = ()
  keep_ratios: tuple[float, ...] = ()
  temperature: float = 1.0
  score: str = "cls"


def staged_options(name: str, spec, geo: Geometry, scores: bool = True) -> StagedOptions:
  """Locations and one of keep_ratio (scalar: cumulative, rho ** (s + 1); or one per stage)
  or keep_counts, checked against the model; `score` checked only where it `scores`."""
  check_keys(name, spec, ("locations", "keep_ratio", "keep_counts", "keep_ratios",
                          "temperature", "score"))
  n = geo.num_patches
  temperature = check_temperature(spec)
  score = (resolve_score(spec.get("score", "auto"), geo.has_cls, geo.has_probe) if scores
           else "auto")
  locations = check_locations(name, spec.get("locations", default_locations(geo.depth)),
                              geo.depth)
  if "keep_counts" in spec and "keep_ratio" in spec:
    raise ValueError("give keep_ratio or keep_counts, not both.")
  if "keep_counts" in spec:
    counts = tuple(int(k) for k in spec["keep_counts"])
    if len(counts) != len(locations):
      raise ValueError(f"keep_counts {counts} has {len(counts)} entries for "
                       f"{len(locations)} locations {locations}.")
    if any(not 0 < k <= n for k in counts):
      raise ValueError(f"keep_counts {counts} must each be in [1, {n}] ({n} patch tokens).")
    if any(b > a for a, b in zip(counts, counts[1:])):
      raise ValueError(f"keep_counts must not increase from stage to stage, got {counts}.")
    ratios = spec.get("keep_ratios") or tuple(k / n for k in counts)
  else:
    ratio = spec.get("keep_ratio", 0.7)
    counts = ops.keep_counts(n, ratio, len(locations)
                             if not isinstance(ratio, (list, tuple)) else None)
    if len(counts) != len(locations):
      raise ValueError(f"keep_ratio {ratio} gives {len(counts)} stages for "
                       f"{len(locations)} locations {locations}.")
    if min(counts) < 1:
      raise ValueError(f"keep_ratio {ratio} keeps no token at some stage of {n} patches: "
                       f"counts {counts}.")
    ratios = (tuple(float(r) for r in ratio) if isinstance(ratio, (list, tuple)) else
              tuple(float(ratio) ** (s + 1) for s in range(len(locations))))
  return StagedOptions(locations, counts, tuple(float(r) for r in ratios), temperature, score)


class Staged(Method):
  """Shared by both families: options, token counts, the spec knobs and the MACs of the
  pruned tokens' fate (`prune`)."""
  Options = StagedOptions
  prune: ClassVar[str] = "drop"  # stages.PRUNE: what happens to the pruned tokens
  extra_tokens: ClassVar[int] = 0  # tokens a stage that prunes adds (EViT's fused token)

  def options(self, spec, geo):
    return staged_options(self.name, spec, geo)

  def acts_at(self, o, i):
    return i in o.locations

  def uses_probe(self, o):
    return o.score == "map_probe"

  def stage_blocks(self, o):
    return o.locations

  def keep_ratios(self, o):
    return o.keep_ratios

  def summary(self, o):
    return {"keep_counts": list(o.keep_counts)}

  def spec(self, *, keep_ratio=0.7, locations=DEFAULT_LOCATIONS, r=0):
    return {"method": self.name, "keep_ratio": keep_ratio, "locations": tuple(locations)}

  def example(self, geo):
    return {"method": self.name, "keep_ratio": 0.7, "locations": default_locations(geo.depth)}

  def identity(self, geo):
    return {**self.example(geo), "keep_ratio": 1.0}

  def _pruned_macs(self, n: int, k: int, d: int) -> int:
    """MACs of what happens to the n - k pruned tokens (squeeze: similarities and fusion)."""
    if self.prune == "squeeze":
      return 2 * (n - k) * k * d
    if self.prune == "fuse":
      return (n - k) * d
    return 0


class LearnedStage(Staged):
  """A score head (models/score_head.py) before each stage block, `score_head_{s}`."""
  learned = True

  def options(self, spec, geo):  # the score head scores: no attention score to check
    return staged_options(self.name, spec, geo, scores=False)

  def tokens(self, o, geo):
    out, n, at = [], geo.num_patches, dict(zip(o.locations, o.keep_counts))
    for i in range(geo.depth):
      n = at.get(i, n)
      out.append((n, n, n))
    return tuple(out)

  def block(self, o, i, block: Block, state: TokenState, ctx: Context) -> TokenState:
    from tps_jax.models.score_head import ScoreHead  # pylint: disable=g-import-not-at-top
    s = o.locations.index(i)
    head = ctx.module(ScoreHead, dtype=ctx.dtype, name=f"score_head_{s}")
    p, first, x = ctx.prefix, ctx.first, state.x
    if ctx.masked:  # fixed shapes: decisions as a mask, attention by policy
      logits = head(x[:, p:], state.live)
      rng = ctx.make_rng("gumbel") if ctx.gumbel_noise else None
      keep = ops.gumbel_softmax_hard(logits, rng)[..., 0] * state.live
      x, host, new_index, size = ctx.checkpoint(functools.partial(
          stages.decide_masked, squeeze=self.prune == "squeeze", temperature=o.temperature,
          prefix=p))(x, keep, state.live, size=state.size)
      hosts = jnp.pad(jnp.where(host >= 0, host + first, -1), ((0, 0), (first, 0)),
                      constant_values=-1)
      state = state.replace(
          x=x, size=size, live=keep,
          owner=state.follow(new_index),
          decisions=state.decisions + (readout_kept(jnp.pad(keep, ((0, 0), (first, 0))), ctx),),
          hosts=state.hosts + (hosts,))
    else:
      logits = head(x[:, p:], jnp.ones(x.shape[:2], jnp.float32)[:, p:])
      st = ctx.checkpoint(functools.partial(
          stages.prune_by_scores, k=o.keep_counts[s], num_patches=ctx.num_patches,
          method=self.prune, temperature=o.temperature, prefix=p, ordered=ctx.ordered))(
              x, logits[..., 0], state.positions, size=state.size)
      state = state.after_stage(st, ctx)
    return state.replace(x=block.whole(state.x, policy=state.policy(ctx)))

  def extra_macs(self, o, geo, dims: Dims):
    heads = reduction = 0
    n = geo.num_patches
    for k in o.keep_counts:
      heads += score_head_macs(n, dims.width)
      reduction += self._pruned_macs(n, k, dims.width)
      n = k
    return {"score_heads": heads, "reduction": reduction}


class AttentionStage(Staged):
  """The stage block's attention scores the tokens (`score`); the stage runs between its
  attention and its MLP."""

  def tokens(self, o, geo):
    out, n, at = [], geo.num_patches, dict(zip(o.locations, o.keep_counts))
    for i in range(geo.depth):
      before = n
      if i in at:
        n = at[i] + (self.extra_tokens if at[i] < before else 0)
      out.append((before, n, n))
    return tuple(out)

  def block(self, o, i, block: Block, state: TokenState, ctx: Context) -> TokenState:
    y, info = attend_for(block, o.score, ctx)(state.x)
    st = ctx.checkpoint(functools.partial(
        stages.prune_by_scores, k=o.keep_counts[o.locations.index(i)], method=self.prune,
        num_patches=ctx.num_patches, temperature=o.temperature, prefix=ctx.prefix,
        ordered=ctx.ordered))(
            y, attention_scores(info, o.score, ctx.prefix), state.positions, size=state.size)
    state = state.after_stage(st, ctx)
    return state.replace(x=block.feed(state.x))

  def extra_macs(self, o, geo, dims: Dims):
    reduction, n, p = 0, geo.num_patches, geo.prefix
    for k in o.keep_counts:
      # the score row (cls or mean query); "received" is the attention matrix's column means
      reduction += (n + p) * dims.width + self._pruned_macs(n, k, dims.width)
      n = k + (self.extra_tokens if k < n else 0)
    return {"reduction": reduction}
