"""Which token reduction a ViT runs, where, and how many tokens each stage keeps.

`Reduction.create(method=..., locations=..., keep_ratio=... | keep_counts=... | r=...)`
checks everything against the model's depth and token count at construction,
so a model that builds has static, valid shapes at every block.

Methods (SPEC sections 2-3):
  none        dense model
  dtps        learned score head before each stage block; pruned tokens squeezed
  dynamicvit  learned score head before each stage block; pruned tokens dropped
  etps        attention scores inside each stage block; pruned tokens squeezed
  evit        attention scores inside; pruned tokens fused into one extra token
  topk        attention scores inside; pruned tokens dropped
  tome        ToMe merging of `r` tokens inside every block (or the given ones)
  pitome      PiToMe (NeurIPS 2024): inside every block, keep `keep_ratio` of the tokens
              by merging the crowded (high-energy) ones; isolated tokens are protected
  diffrate    DiffRate (ICCV 2023): in each block, sort by cls attention, prune to
              `prune_kept[i]`, merge the rest beyond `merge_kept[i]` into their most
              similar kept token (a schedule, e.g. from tps_jax.diffrate_search)
  mctf        MCTF (CVPR 2024): in the given blocks, fuse `r` tokens by bipartite matching
              weighted by similarity, informativeness and size, one step ahead of the
              attention (MCTFOptions)

The attention score of etps / evit / topk (`score`, SCORES): "cls", the attention from
the cls token (the papers'; models with a cls token); for models without one (GAP, MAP,
pool "0", none) "received", the attention each token receives averaged over queries and
heads, or "mean_query", the attention from the mean query. "auto" picks cls where there is
a cls token and CLS_FREE_SCORE otherwise (README, "Models without a cls token").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from tps_jax import ops

# The one list of methods: configs, experiments and benchmarks take theirs from here.
METHODS = ("none", "dtps", "dynamicvit", "etps", "evit", "topk", "tome", "pitome", "mctf",
           "diffrate")
MERGING = ("tome", "pitome", "mctf")  # merge inside every block (a per-block count, `tome_r`)
LEARNED = ("dtps", "dynamicvit")  # score head, between blocks
INTRA_BLOCK = ("etps", "evit", "topk")  # cls attention, inside the block
SQUEEZING = ("dtps", "etps")
TRAINING_FREE = INTRA_BLOCK + MERGING + ("diffrate",)  # run on a dense model's parameters as they are
# Each TPS variant and the baseline with its scorer that drops (DynamicViT) or fuses (EViT).
TPS_BASELINES = {"dtps": "dynamicvit", "etps": "evit"}
DEFAULT_LOCATIONS = (3, 6, 9)
SCORES = ("auto", "cls", "received", "mean_query")
CLS_FREE_SCORE = "received"  # chosen by measurement on the GAP teacher (README)


def spec(method: str, keep_ratio: float = 0.7, locations=DEFAULT_LOCATIONS,
         r: int = 0) -> dict[str, Any] | None:
  """The reduction mapping a config carries for `method` (None for the dense model).

  keep_ratio and locations serve the staged methods, r (tokens merged per block) ToMe.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}.")
  if method == "none":
    return None
  if method == "tome":
    return {"method": "tome", "r": r}
  if method == "pitome":  # keep_ratio is per block here, as the authors' `ratio`
    return {"method": "pitome", "keep_ratio": keep_ratio}
  if method == "mctf":  # the authors' DeiT setting: r per block in blocks 1..depth-1
    return {"method": "mctf", "r": r}
  if method == "diffrate":
    raise ValueError("diffrate runs a per-block schedule: give {'method': 'diffrate', "
                     "'prune_kept': [...], 'merge_kept': [...]} (e.g. from "
                     "tps_jax.trainer.rate_search.search).")
  return {"method": method, "keep_ratio": keep_ratio, "locations": tuple(locations)}


ONE_STEP_AHEAD = (0, 1, 2)  # MCTF: merge after the block / before its attention / precisely


@dataclasses.dataclass(frozen=True)
class MCTFOptions:
  """MCTF's settings, defaults as the authors' DeiT runs (`--mctf_type
  [16,0,0,1,1,1,20,40,1,1,0]`): temperatures of the similarity, informativeness and size
  criteria (0 drops one), bidirectional matching, one-step-ahead mode (0: merge after the
  block with its attention; 1: merge before the attention, whose matrix is merged rather
  than recomputed; 2: merge before and recompute), the pooling ("attn", "size", "mean",
  ops.mctf.POOLINGS) and proportional attention (log size added to the logits)."""
  tau_sim: float = 1.0
  tau_info: float = 20.0
  tau_size: float = 40.0
  bidirection: bool = True
  one_step_ahead: int = 1
  pooling: str = "attn"
  prop_attn: bool = True


MCTF_KEYS = tuple(f.name for f in dataclasses.fields(MCTFOptions))


@dataclasses.dataclass(frozen=True)
class Reduction:
  """A validated, hashable reduction plan.

  method: one of METHODS.
  locations: block indices of the stages (dtps/dynamicvit: before that block;
    etps/evit/topk: inside it). Empty for none/tome.
  keep_counts: patch tokens kept after each stage (cls excluded).
  tome_r: tokens ToMe / PiToMe merge in each block (length = depth), zeros elsewhere.
  margins: PiToMe's energy margin per block (the authors': 0.75 - 0.75 * block / depth).
  bsm_blocks: PiToMe's first `bsm_blocks` blocks match bipartitely over all tokens (the
    authors': half the blocks, rounded up), the rest merge only high-energy tokens.
  temperature: of the squeeze similarity.
  keep_ratios: the ratio each stage aims at (rho_s of the keep-ratio loss):
    rho ** (s + 1) for a scalar keep_ratio, the list as given, or
    keep_counts / num_patches.
  """
  method: str = "none"
  locations: tuple[int, ...] = ()
  keep_counts: tuple[int, ...] = ()
  tome_r: tuple[int, ...] = ()
  margins: tuple[float, ...] = ()
  bsm_blocks: int = 0
  temperature: float = 1.0
  keep_ratios: tuple[float, ...] = ()
  score: str = "auto"  # SCORES: how etps / evit / topk score tokens
  mctf: MCTFOptions | None = None  # method "mctf" only
  prune_counts: tuple[int, ...] = ()  # diffrate: patch tokens kept by pruning at each location

  def score_for(self, has_cls: bool) -> str:
    """The attention score an intra-block stage uses in a model with / without cls."""
    if self.score == "auto":
      return "cls" if has_cls else CLS_FREE_SCORE
    if self.score == "cls" and not has_cls:
      raise ValueError("reduction score 'cls' needs a cls token (pool_type 'tok'); use "
                       "'received' or 'mean_query' (or 'auto') for this model.")
    return self.score

  @property
  def stage_at(self) -> dict[int, int]:
    """Block index -> stage index."""
    return {loc: s for s, loc in enumerate(self.locations)}

  @property
  def learned(self) -> bool:
    return self.method in LEARNED

  @property
  def intra_block(self) -> bool:
    """Scores from attention inside the stage block (etps, evit, topk, diffrate)."""
    return self.method in INTRA_BLOCK or self.method == "diffrate"

  @property
  def squeezes(self) -> bool:
    return self.method in SQUEEZING

  def tokens_per_block(self, num_patches: int, depth: int,
                       prefix: int = 1) -> tuple[int, ...]:
    """Tokens (the `prefix` protected ones included) each block's MLP runs on, at inference;
    `num_patches` counts the tokens a stage may reduce."""
    n, out = num_patches, []
    stage_at = self.stage_at
    for i in range(depth):
      if i in stage_at:
        n = self.keep_counts[stage_at[i]] + (1 if self.method == "evit" else 0)
      after = self.tome_r and self.mctf is not None and self.mctf.one_step_ahead == 0
      if self.tome_r and not after:
        n -= self.tome_r[i]
      out.append(n + prefix)
      if after:  # MCTF without one-step-ahead merges after the block's MLP
        n -= self.tome_r[i]
    return tuple(out)

  @classmethod
  def create(cls, spec: "Reduction | Mapping[str, Any] | str | None", *, depth: int,
             num_patches: int, prefix: int = 1) -> "Reduction":
    """Builds and validates a plan for a ViT of `depth` blocks over `num_patches` patches.

    `num_patches` counts the tokens stages may reduce; `prefix` the protected tokens before
    them (1: cls, or the readout token of pool "0"; 0: GAP / MAP models).

    `spec` is a Reduction, a method name, None (dense) or a mapping with keys
    `method`, `locations`, and one of `keep_ratio` (a scalar: cumulative, rho ** (s+1);
    or one ratio per stage), `keep_counts`, or for tome `r` (int or per-block list).
    """
    if isinstance(spec, Reduction) and spec.method == "mctf" and spec.mctf is None:
      raise ValueError("an mctf Reduction needs its MCTFOptions (mctf=...); build it with "
                       "Reduction.create({'method': 'mctf', ...}).")
    if isinstance(spec, Reduction) and spec.method in ("pitome", "mctf"):  # a per-block plan
      if len(spec.tome_r) != depth or (spec.method == "pitome" and len(spec.margins) != depth):
        raise ValueError(f"this {spec.method} plan was made for depth {len(spec.tome_r)}, the "
                         f"model has {depth} blocks.")
      if sum(spec.tome_r) >= num_patches:
        raise ValueError(f"this {spec.method} plan merges {sum(spec.tome_r)} of {num_patches} "
                         f"patches.")
      return spec
    if isinstance(spec, Reduction) and spec.method == "diffrate":  # its schedule, re-checked
      n = len(spec.locations)
      if len(spec.prune_counts) != n or len(spec.keep_counts) != n:
        raise ValueError(f"this diffrate plan has {n} locations, {len(spec.prune_counts)} "
                         f"prune counts and {len(spec.keep_counts)} keep counts.")
      if spec.locations and max(spec.locations) >= depth:
        raise ValueError(f"this diffrate plan reduces at block {max(spec.locations)}, the model "
                         f"has {depth} blocks.")
      if spec.prune_counts and max(spec.prune_counts) > num_patches:
        raise ValueError(f"this diffrate plan keeps {max(spec.prune_counts)} patches, the model "
                         f"has {num_patches}.")
      return _diffrate_plan(cls, diffrate_schedule(spec, depth, num_patches), depth,
                            num_patches, spec.temperature, spec.score)
    if spec is None:
      spec = {"method": "none"}
    elif isinstance(spec, str):
      spec = {"method": spec}
    elif isinstance(spec, Reduction):
      spec = {k: v for k, v in dataclasses.asdict(spec).items()
              if k not in ("mctf", "prune_counts")}
    spec = dict(spec)
    allowed = {"method", "locations", "keep_ratio", "keep_counts", "keep_ratios", "r",
               "tome_r", "temperature", "score", "margins", "bsm_blocks", "prune_kept",
               "merge_kept", *MCTF_KEYS}
    unknown = sorted(set(spec) - allowed)
    if unknown:
      raise ValueError(f"unknown reduction keys {unknown}; expected some of {sorted(allowed)}.")
    method = spec.get("method", "none")
    if method not in METHODS:
      raise ValueError(f"unknown reduction method {method!r}; expected one of {METHODS}.")
    foreign = sorted(set(spec) & set(MCTF_KEYS)) if method != "mctf" else []
    if foreign:
      raise ValueError(f"reduction keys {foreign} are MCTF's; method {method!r} takes none.")
    if method != "diffrate" and ("prune_kept" in spec or "merge_kept" in spec):
      raise ValueError(f"prune_kept / merge_kept are DiffRate's; method {method!r} takes none.")
    temperature = float(spec.get("temperature", 1.0))
    if not temperature > 0:
      raise ValueError(f"reduction temperature must be > 0, got {temperature}.")
    score = spec.get("score", "auto")
    if score not in SCORES:
      raise ValueError(f"unknown reduction score {score!r}; expected one of {SCORES}.")

    if method == "none":
      return cls("none", temperature=temperature, score=score)
    if method == "tome":
      return cls("tome", tome_r=_tome_schedule(spec, depth, num_patches, prefix),
                 temperature=temperature, score=score)
    if method == "pitome":
      return _pitome_plan(cls, spec, depth, num_patches, temperature, score)
    if method == "mctf":
      return _mctf_plan(cls, spec, depth, num_patches, prefix, temperature, score)
    if method == "diffrate":
      return _diffrate_plan(cls, spec, depth, num_patches, temperature, score)

    locations = tuple(int(l) for l in spec.get("locations", DEFAULT_LOCATIONS))
    if not locations:
      raise ValueError(f"reduction method {method!r} needs at least one location.")
    if list(locations) != sorted(set(locations)):
      raise ValueError(f"reduction locations must be strictly increasing, got {locations}.")
    bad = [l for l in locations if not 0 <= l < depth]
    if bad:
      raise ValueError(f"reduction locations {bad} are outside the model's blocks "
                       f"[0, {depth - 1}] (depth={depth}).")
    if "keep_counts" in spec and "keep_ratio" in spec:
      raise ValueError("give keep_ratio or keep_counts, not both.")
    if "keep_counts" in spec:
      counts = tuple(int(k) for k in spec["keep_counts"])
      if len(counts) != len(locations):
        raise ValueError(f"keep_counts {counts} has {len(counts)} entries for "
                         f"{len(locations)} locations {locations}.")
      if any(not 0 < k <= num_patches for k in counts):
        raise ValueError(f"keep_counts {counts} must each be in [1, {num_patches}] "
                         f"({num_patches} patch tokens).")
      if any(b > a for a, b in zip(counts, counts[1:])):
        raise ValueError(f"keep_counts must not increase from stage to stage, got {counts}.")
      ratios = spec.get("keep_ratios") or tuple(k / num_patches for k in counts)
    else:
      ratio = spec.get("keep_ratio", 0.7)
      counts = ops.keep_counts(num_patches, ratio, len(locations)
                               if not isinstance(ratio, (list, tuple)) else None)
      if len(counts) != len(locations):
        raise ValueError(f"keep_ratio {ratio} gives {len(counts)} stages for "
                         f"{len(locations)} locations {locations}.")
      if min(counts) < 1:
        raise ValueError(f"keep_ratio {ratio} keeps no token at some stage of "
                         f"{num_patches} patches: counts {counts}.")
      ratios = (tuple(float(r) for r in ratio) if isinstance(ratio, (list, tuple)) else
                tuple(float(ratio) ** (s + 1) for s in range(len(locations))))
    return cls(method, locations, counts, temperature=temperature,
               keep_ratios=tuple(float(r) for r in ratios), score=score)


def _pitome_plan(cls, spec: Mapping[str, Any], depth: int, num_patches: int,
                 temperature: float, score: str) -> "Reduction":
  """PiToMe as the authors' DeiT patch runs it: in block i of T patch tokens, merge
  floor(T - T * keep_ratio) of them (cls, or the protected prefix, never)."""
  if "locations" in spec or "keep_counts" in spec or "r" in spec:
    raise ValueError("pitome merges in every block by its keep_ratio (the authors' `ratio`); "
                     "it takes no locations, keep_counts or r.")
  ratio = spec.get("keep_ratio", 0.9)
  if isinstance(ratio, (list, tuple)) or not 0.5 <= float(ratio) <= 1.0:
    raise ValueError(f"pitome keep_ratio is one ratio per block in [0.5, 1] (the authors' "
                     f"`ratio`; below 0.5 its matching has too few tokens), got {ratio!r}.")
  margins = spec.get("margins")
  margins = (tuple(0.75 - 0.75 * i / depth for i in range(depth)) if margins is None
             else tuple(float(m) for m in margins))
  if len(margins) != depth:
    raise ValueError(f"pitome margins list {len(margins)} values for a model of depth {depth}.")
  bsm_blocks = int(spec.get("bsm_blocks", math.ceil(depth / 2)))
  if not 0 <= bsm_blocks <= depth:
    raise ValueError(f"pitome bsm_blocks must be in [0, {depth}], got {bsm_blocks}.")
  schedule, t = [], num_patches
  for _ in range(depth):
    r = math.floor(t - t * float(ratio))  # the authors' arithmetic, in Python floats
    schedule.append(r)
    t -= r
  return cls("pitome", tome_r=tuple(schedule), margins=margins, bsm_blocks=bsm_blocks,
             keep_ratios=(float(ratio),), temperature=temperature, score=score)


def _diffrate_plan(cls, spec: Mapping[str, Any], depth: int, num_patches: int,
                   temperature: float, score: str) -> "Reduction":
  """DiffRate's schedule: per block, the patch tokens (cls excluded; the authors count it) kept
  after pruning and after merging; counts above the tokens left change nothing."""
  extra = sorted(set(spec) & {"keep_ratio", "keep_counts", "r", "margins", "locations"})
  if extra:
    raise ValueError(f"diffrate takes per-block prune_kept and merge_kept lists, not {extra}.")
  lists = {}
  for key in ("prune_kept", "merge_kept"):
    v = spec.get(key)
    if v is None:
      raise ValueError(f"diffrate needs {key}: one count per block ({depth}).")
    v = tuple(int(c) for c in v)
    if len(v) != depth:
      raise ValueError(f"diffrate {key} lists {len(v)} counts for a model of depth {depth}.")
    if any(c < 1 for c in v):
      raise ValueError(f"diffrate {key} counts must be >= 1, got {v}.")
    lists[key] = v
  locations, prune_counts, keep_counts, n = [], [], [], num_patches
  for i, (p, m) in enumerate(zip(lists["prune_kept"], lists["merge_kept"])):
    a = min(n, p)
    b = min(a, m)
    if b < n:
      locations.append(i); prune_counts.append(a); keep_counts.append(b)
      n = b
  return cls("diffrate", tuple(locations), tuple(keep_counts), temperature=temperature,
             keep_ratios=tuple(k / num_patches for k in keep_counts), score=score,
             prune_counts=tuple(prune_counts))


def diffrate_schedule(plan: Mapping[str, Any] | "Reduction", depth: int,
                      num_patches: int) -> dict[str, tuple[int, ...]]:
  """A diffrate plan's per-block prune_kept / merge_kept lists (the effective counts)."""
  get = (lambda k: plan[k]) if isinstance(plan, Mapping) else (lambda k: getattr(plan, k))
  at = dict(zip(get("locations"), zip(get("prune_counts"), get("keep_counts"))))
  prune, merge, n = [], [], num_patches
  for i in range(depth):
    a, b = at.get(i, (n, n))
    prune.append(a); merge.append(b)
    n = b
  return {"prune_kept": tuple(prune), "merge_kept": tuple(merge)}


def _mctf_plan(cls, spec: Mapping[str, Any], depth: int, num_patches: int, prefix: int,
               temperature: float, score: str) -> "Reduction":
  """MCTF as the authors' DeiT runs it: in each activated block (`locations`, default
  1..depth-1) of t tokens, `r` (an int, or a fraction < 1 of the t - prefix reducible
  ones) fused, by their arithmetic: at least 10 tokens stay, at most half the reducible
  ones merge."""
  if "keep_ratio" in spec or "keep_counts" in spec or "margins" in spec:
    raise ValueError("mctf fuses `r` tokens in each of its `locations` (the authors' r and "
                     "activate_layer); it takes no keep_ratio, keep_counts or margins.")
  r = spec.get("r", spec.get("tome_r", 16))
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
  opts = {k: spec[k] for k in MCTF_KEYS if k in spec}
  try:
    options = MCTFOptions(**opts)
  except TypeError as e:  # pragma: no cover - keys are checked above
    raise ValueError(str(e)) from None
  for name in ("tau_sim", "tau_info", "tau_size"):
    v = getattr(options, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      raise ValueError(f"mctf {name} must be a number >= 0 (0 drops the criterion), got {v!r}.")
  if options.one_step_ahead not in ONE_STEP_AHEAD:
    raise ValueError(f"mctf one_step_ahead must be one of {ONE_STEP_AHEAD}, got "
                     f"{options.one_step_ahead!r}.")
  if options.pooling not in ops.mctf.POOLINGS:
    raise ValueError(f"unknown mctf pooling {options.pooling!r}; expected one of "
                     f"{ops.mctf.POOLINGS} (the authors' max pooling is not offered).")
  options = dataclasses.replace(options, tau_sim=float(options.tau_sim),
                                tau_info=float(options.tau_info),
                                tau_size=float(options.tau_size),
                                bidirection=bool(options.bidirection),
                                prop_attn=bool(options.prop_attn))
  schedule, t = [], num_patches + prefix
  for v in wanted:
    if v == 0:
      schedule.append(0)
      continue
    if t - v < 10:  # the authors' arithmetic (utils/mctf.py), before the fraction
      v = t - 10
    n = min(int((t - prefix) * v) if v < 1 else int(v), (t - prefix) // 2)
    n = max(n, 0)
    schedule.append(n)
    t -= n
  return cls("mctf", tome_r=tuple(schedule), temperature=temperature, score=score,
             mctf=options)


def _tome_schedule(spec: Mapping[str, Any], depth: int, num_patches: int,
                   prefix: int = 1) -> tuple[int, ...]:
  r = spec.get("r", spec.get("tome_r", 0))
  locations = spec.get("locations")
  if isinstance(r, (list, tuple)):
    if len(r) != depth:
      raise ValueError(f"tome r lists {len(r)} values for a model of depth {depth}.")
    schedule = [int(x) for x in r]
  else:
    blocks = range(depth) if locations is None else [int(l) for l in locations]
    bad = [l for l in blocks if not 0 <= l < depth]
    if bad:
      raise ValueError(f"tome locations {bad} are outside the model's blocks [0, {depth - 1}].")
    schedule = [int(r) if i in blocks else 0 for i in range(depth)]
  n = num_patches + prefix
  for i, ri in enumerate(schedule):
    most = ops.max_merge(n, class_token=prefix > 0)
    if not 0 <= ri <= most:
      raise ValueError(f"tome r={ri} at block {i} does not fit: {n} tokens there allow "
                       f"at most {most} merges (schedule {schedule}).")
    n -= ri
  return tuple(schedule)
