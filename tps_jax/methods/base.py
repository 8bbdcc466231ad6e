"""The interface between the encoder and a token-reduction method.

The encoder (`tps_jax.models.vit.Encoder`) runs blocks. At each block a method says it acts at
(`Method.acts_at`) it hands the method that block's functions (`Block`), the token state
(`TokenState`) and what the method may need of the model (`Context`), and takes back the new
state. Every other block runs whole, in runs that `scan` and remat see as one.

A method declares, in one class:
  Options       a frozen dataclass: its validated, hashable settings;
  options()     the spec mapping -> Options, checked against the model (`Geometry`);
  tokens()      the reducible tokens each block's attention and MLP run on and leave, at
                inference: the one source of the encoder's shapes (checked at trace time), of
                FLOPs and of plots;
  block()       what it does at a block it acts at: before it, inside its attention, after it;
  extra_macs()  its own MACs beyond the dense blocks' (score heads, matching, merging);
  learned       whether it has parameters to train (a score head) or runs on a dense model;
  example()     a spec at its paper's operating point, which tests, benchmarks and studies take.

`docs/extending.md` walks through writing one; `docs/method.md` states each built-in's math.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp

from tps_jax import ops
from tps_jax.methods import stages


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What a method's options are checked against.

  Attributes:
    depth: blocks of the model.
    num_patches: tokens a method may reduce (the patch tokens, less pool "0"'s readout).
    prefix: protected tokens leading the sequence (cls, or pool "0"'s readout token; 0 for
      GAP / MAP models).
    has_cls: whether token 0 is a cls token (attention from it can score the patches).
    has_probe: whether the model pools with a MAP head, whose probe query can score them.
  """
  depth: int
  num_patches: int
  prefix: int = 1
  has_cls: bool = True
  has_probe: bool = False


@dataclasses.dataclass(frozen=True)
class Dims:
  """The block sizes MACs are counted with."""
  width: int
  mlp_dim: int
  num_heads: int


def attention_macs(n: int, d: int) -> int:
  """q, k, v and out projections plus the two (n, n) products of one attention over n tokens."""
  return 4 * n * d * d + 2 * n * n * d


def mlp_macs(n: int, d: int, m: int) -> int:
  return 2 * n * d * m


def score_head_macs(n: int, d: int) -> int:
  """DynamicViT's score head (models/score_head.py) over n tokens of width d."""
  return n * (d * d + d * (d // 2) + (d // 2) * (d // 4) + (d // 4) * 2)


@dataclasses.dataclass(frozen=True)
class Context:
  """What a method may use of the model while it acts at a block (static per call).

  Attributes:
    prefix: protected tokens leading the sequence (never reduced).
    first: patch position of the first reducible token (1 for pool "0", whose token 0 is
      kept as its readout; else 0).
    num_patches: N0, the image's patches (decisions and hosts are (B, N0)).
    has_cls: token 0 is a cls token.
    train: the training forward (dropout, Gumbel noise, masked decisions).
    masked: learned decisions in their fixed-shape training form (`TokenState.live`).
    dtype: the compute dtype.
    gumbel_noise: whether learned decisions sample Gumbel noise in training.
    checkpoint: wraps a stage's pure function for rematerialisation (identity without remat).
    module: `module(cls, **kw)` builds a submodule of the encoder (its parameters sit under
      "Transformer/<name>"), rematerialised when the model is.
    make_rng: the encoder's `make_rng` (streams "gumbel", "dropout").
    ordered: the token sequence itself is the model's output (pool_type "none", e.g. a
      PaliGemma prefix): a stage keeps its tokens in their order, not by score.
    probe: (H, D/H) the MAP head's probe query per head, where the method asked for it
      (`Method.uses_probe`), else None.
  """
  prefix: int
  first: int
  num_patches: int
  has_cls: bool
  train: bool
  masked: bool
  dtype: Any
  gumbel_noise: bool
  checkpoint: Callable[[Callable], Callable]
  module: Callable[..., Any]
  make_rng: Callable[[str], jax.Array]
  ordered: bool = False
  probe: Any = None


@dataclasses.dataclass(frozen=True)
class TokenState:
  """The token sequence between blocks, and what the stages so far recorded.

  Attributes:
    x: (B, P + N, D) the tokens, P = `Context.prefix` protected ones first.
    positions: (B, N) original patch index of each reducible token (-1: no patch, such as
      EViT's fused token).
    size: (B, P + N) patches each token stands for, or None where nothing needs it.
    live: (B, N0 - first) 0/1 live tokens of the masked training form, or None (gather form).
    owner: (B, N0) index of the token each patch ended in (-1: dropped), or None when the
      model does not follow patches (`outputs_2d`).
    merged: a merge has happened, or a stage that carries sizes (methods that add the
      log-size bias after one); `after_stage` and `after_merge` set it.
    decisions, hosts, keep_indices: per stage, (B, N0) kept patches, (B, N0) host of each
      patch pruned there (-1 elsewhere) and (B, k) the kept patches' positions.
    carry: the method's own values from block to block (any pytree of arrays, e.g. a mask and
      running counts), or None; the model returns the last as `out["carry"]`.
  """
  x: jax.Array
  positions: jax.Array
  size: jax.Array | None = None
  live: jax.Array | None = None
  owner: jax.Array | None = None
  merged: bool = False
  decisions: tuple = ()
  hosts: tuple = ()
  keep_indices: tuple = ()
  carry: Any = None

  def replace(self, **kw) -> "TokenState":
    return dataclasses.replace(self, **kw)

  def policy(self, ctx: Context) -> jax.Array | None:
    """(B, P + N0) the attention policy of the masked form (protected tokens live), or None."""
    if self.live is None:
      return None
    return jnp.pad(self.live, ((0, 0), (ctx.prefix, 0)), constant_values=1.0)

  def follow(self, new_index) -> jax.Array | None:
    """`owner` through a stage's or merge's `new_index` (None when patches are not followed)."""
    if self.owner is None:
      return None
    return stages.follow(self.owner, new_index)

  def after_stage(self, st: stages.StageOut, ctx: Context) -> "TokenState":
    """The state after a pruning stage (gather form, `stages.mixed` included): its tokens, its
    record, each patch's token followed, and, where the stage carries sizes, `merged` set (a
    token may now stand for several patches; one that stands for one has a log-size bias of
    0)."""
    return self.replace(x=st.x, positions=st.positions, size=st.size,
                        merged=self.merged or st.size is not None,
                        owner=self.follow(st.new_index),
                        decisions=self.decisions + (readout_kept(st.decision, ctx),),
                        hosts=self.hosts + (st.hosts,),
                        keep_indices=self.keep_indices + (st.positions,))

  def after_merge(self, x: jax.Array, size: jax.Array | None,
                  new_index: jax.Array | None) -> "TokenState":
    """The state after a merge: tokens, sizes and where each old token went (None allowed
    only when patches are not followed, `owner` None)."""
    if self.owner is not None and new_index is None:
      raise ValueError("a merge that is followed (owner tracked) needs its new_index.")
    return self.replace(x=x, size=size, owner=self.follow(new_index), merged=True)


def readout_kept(decision: jax.Array, ctx: Context) -> jax.Array:
  """A (B, N0) decision with pool "0"'s readout patch kept."""
  return decision.at[:, :ctx.first].set(1.0) if ctx.first else decision


def size_bias(state: TokenState) -> jax.Array | None:
  """ToMe's proportional attention: log size added to the logits (None before any merge)."""
  return ops.proportional_attention_bias(state.size) if state.merged else None


class Block:
  """The functions of block i that a method may call (the encoder makes one per block).

  Primitives, which a method composes (q, k, v are (B, T, H, D/H), queries unscaled):
    qkv(x): the queries, keys and values of LN(x), x (B, T, D).
    attention(q, k, v, bias=None, policy=None): softmax(q k^T / sqrt(d) + bias) v in the
      block's implementation (B, T, H, D/H); under a `policy` (B, T) masked keys are invisible.
    probs(q, k, bias=None, policy=None): the whole softmax matrix (B, H, T, T), float32.
    residual(x, y): the first half's end, x + out_projection(y) (dropout, drop path).
    feed(x): the second residual half, x + MLP(LN x).
  `ops.attention_row(query, k)` gives one query's row (a cls row, a mean query's); with the
  primitives, `residual(x, block.attention(*block.qkv(x)))` is the first half.

  Compositions of them that the built-in methods share; each takes and returns (B, T, D)
  token arrays, and T may change between the first half and `feed`:
    whole(x, policy=None, bias=None): the whole block, x + Attn(LN x), then + MLP(LN x).
    attend(x, bias=None, probe=None): the first residual half -> (x', AttentionOut) with the
      cls row (`cls_attn`), the head-mean keys (`keys`), the mean query's row (`mean_query`)
      and, given a query per head `probe` (H, D/H) (`Context.probe`), its row (`probe`).
    attend_matrix(x, bias=None, probe=None, policy=None): `attend` that forms the whole
      attention matrix and also returns `received` (its column means) and `probs` (B, H, T, T);
      under a `policy` (B, T) (a float mask; with a bias too) the softmax ignores masked keys.
    attention_probs(x, bias=None): the softmax attention of LN(x) alone (B, H, T, T).
    attend_ahead(x, probs, value_index, plan, weights): the first half on merged tokens x
      (B, T', D) with the attention `probs` (B, H, T, T) of the tokens before the merge:
      out(merge(probs @ v[value_index])), merge by `plan` (ops.MergePlan) and `weights` (B, T).
  `bias` is an additive logit bias (B, 1|H, 1|T, T); `policy` (B, T) 0/1 masks attention to
  dropped tokens (the masked training form).
  """

  def __init__(self, apply: Callable[..., Any], index: int):
    self._apply, self.index = apply, index
    # The tokens its attention and its MLP first ran on (read by the encoder, which derives a
    # method's per-block token counts from them where the method declares none).
    self.attention_tokens: int | None = None
    self.mlp_tokens: int | None = None

  def _attends(self, x):
    if self.attention_tokens is None:
      self.attention_tokens = x.shape[1]

  def _feeds(self, x):
    if self.mlp_tokens is None:
      self.mlp_tokens = x.shape[1]

  def qkv(self, x):
    self._attends(x)
    return self._apply(self.index, "qkv", x)

  def attention(self, q, k, v, bias=None, policy=None):
    self._attends(q)
    return self._apply(self.index, "attention", q, k, v, bias=bias, policy=policy)

  def probs(self, q, k, bias=None, policy=None):
    self._attends(q)
    return self._apply(self.index, "probs", q, k, bias=bias, policy=policy)

  def residual(self, x, y):
    return self._apply(self.index, "residual", x, y)

  def whole(self, x, policy=None, bias=None):
    self._attends(x), self._feeds(x)
    return self._apply(self.index, "__call__", x, policy=policy, bias=bias)

  def attend(self, x, bias=None, probe=None):
    self._attends(x)
    return self._apply(self.index, "attend", x, bias=bias, probe=probe)

  def attend_matrix(self, x, bias=None, probe=None, policy=None):
    self._attends(x)
    return self._apply(self.index, "attend_matrix", x, bias=bias, probe=probe, policy=policy)

  def attention_probs(self, x, bias=None):
    self._attends(x)
    return self._apply(self.index, "attention_probs", x, bias=bias)

  def attend_ahead(self, x, probs, value_index, plan: ops.MergePlan, weights):
    self._attends(x)
    return self._apply(self.index, "attend_ahead", x, probs, value_index, *plan, weights)

  def feed(self, x):
    self._feeds(x)
    return self._apply(self.index, "feed", x)


def declares(method: "Method", hook: str) -> bool:
  """Whether `method` overrides the optional `Method` hook `hook` (else its default, derived
  from what the method produces, applies)."""
  return getattr(type(method), hook) is not getattr(Method, hook)


def freeze(spec):
  """A spec as a hashable value (lists -> tuples, mappings -> sorted pairs)."""
  if isinstance(spec, Mapping):
    return tuple(sorted((k, freeze(v)) for k, v in spec.items()))
  if isinstance(spec, list):
    return tuple(freeze(v) for v in spec)
  return spec


def check_keys(name: str, spec: Mapping[str, Any], allowed) -> None:
  """Names the keys of `spec` that method `name` does not take."""
  unknown = sorted(set(spec) - set(allowed) - {"method"})
  if unknown:
    raise ValueError(f"reduction method {name!r} takes no keys {unknown}; it takes "
                     f"{sorted(allowed)}.")


class Method:
  """A token-reduction method. Subclass it, set `Options`, override what differs, and
  decorate the class with `tps_jax.methods.register(name)`.

  Attributes:
    name: set by `register`.
    Options: a frozen dataclass of the method's settings (hashable: the model is static).
    learned: the method has parameters of its own to train (a score head); training-free
      methods run on a dense model's parameters as they are. A learned method trains in the
      masked form: `ctx.masked` is True in training, the state carries `live`, the sequence
      keeps its length (the encoder's token check is then skipped) and the blocks it does not
      act at attend under `state.policy(ctx)`.
    tracks_sizes: the method needs each token's size (patches it stands for) in the state.
    reduces: False only for the dense model's "none".
    merges: tokens may stand for several patches with no single position (token distillation
      then has no teacher token to compare each with: `out["token_sizes"]` says so).
  """
  name: ClassVar[str] = ""
  Options: ClassVar[type] = None  # type: ignore[assignment]
  learned: ClassVar[bool] = False
  tracks_sizes: ClassVar[bool] = False
  reduces: ClassVar[bool] = True
  merges: ClassVar[bool] = False

  def options(self, spec: Mapping[str, Any], geo: Geometry):
    """The spec's keys (without "method") -> a validated `Options`. Raise ValueError naming
    the problem for anything that cannot run on a model of this geometry."""
    raise NotImplementedError

  def revalidate(self, options, geo: Geometry, spec: Mapping[str, Any]):
    """A plan built before (its `options`, from `spec`) checked against `geo`, when a
    Reduction is passed back to a model. By default the spec is checked again."""
    return self.options(spec, geo)

  def tokens(self, options, geo: Geometry) -> tuple[tuple[int, int, int], ...]:
    """Optional. Per block, the reducible tokens (prefix excluded) its attention runs on, its
    MLP runs on, and it leaves, at inference. Where a method declares them the encoder checks
    its shapes against them; where it does not, they are read from the shapes its `block`
    produces (`VisionTransformer.tokens`, one abstract trace)."""
    raise NotImplementedError

  def acts_at(self, options, i: int) -> bool:
    """Whether the method acts at block i (else the block runs whole)."""
    raise NotImplementedError

  def block(self, options, i: int, block: Block, state: TokenState,
            ctx: Context) -> TokenState:
    """Runs block i with the method's reduction and returns the new state."""
    raise NotImplementedError

  def uses_probe(self, options) -> bool:
    """Whether its blocks need the MAP head's probe query (`Context.probe`), which the model
    then computes before the encoder."""
    return False

  def plain_bias(self, options, state: TokenState) -> jax.Array | None:
    """The attention bias of the blocks it does not act at (e.g. ToMe's log size after a
    merge), or None."""
    return None

  def block_macs(self, options, i: int, tokens_attn: int, tokens_mlp: int, dims: Dims) -> int:
    """MACs of block i's attention and MLP at these token counts (the prefix included). The
    dense count unless the method changes the block's own arithmetic."""
    return attention_macs(tokens_attn, dims.width) + mlp_macs(tokens_mlp, dims.width,
                                                              dims.mlp_dim)

  def extra_macs(self, options, geo: Geometry, dims: Dims) -> dict[str, int]:
    """MACs of the method's own work by part ("score_heads", "reduction")."""
    return {}

  def keep_ratios(self, options) -> tuple[float, ...]:
    """The ratio each stage aims at, for the keep-ratio loss of learned methods."""
    return ()

  def stage_blocks(self, options) -> tuple[int, ...]:
    """Optional. Blocks whose stages record decisions and hosts (drawn by `tps_jax.visualize`);
    where a method declares none, `VisionTransformer.stage_blocks` reads them from a trace."""
    return ()

  def summary(self, options) -> dict[str, Any]:
    """A few JSON-able numbers that describe the plan in result rows."""
    return {}

  def spec(self, *, keep_ratio: float = 0.7, locations=(3, 6, 9), r: int = 0) -> dict:
    """The spec of a recipe's common knobs (configs take `keep`, `locations`, `r`); each
    method takes those that apply to it. Without an override the method takes none: give its
    spec as a mapping (`config.model.reduction`)."""
    raise ValueError(f"method {self.name!r} takes none of the recipes' knobs (keep, locations, "
                     f"r): set config.model.reduction to its spec (see its example()).")

  def example(self, geo: Geometry) -> dict:
    """A spec at the paper's operating point, scaled to `geo` (tests, benchmarks, studies)."""
    raise NotImplementedError

  def identity(self, geo: Geometry) -> dict:
    """A spec that reduces nothing: the model must equal the dense one. By default the
    `example` with its keep_ratio at 1.0 and its r at 0; define it where the example has
    neither."""
    spec = dict(self.example(geo))
    knobs = {k: v for k, v in (("keep_ratio", 1.0), ("r", 0)) if k in spec}
    if not knobs:
      raise NotImplementedError(f"method {self.name!r}: its example has no keep_ratio or r to "
                                f"turn off; define identity(geo), a spec that reduces nothing.")
    return {**spec, **knobs}


@dataclasses.dataclass(frozen=True)
class Reduction:
  """A method and its validated options for one model geometry: hashable, so a model that
  holds it is static. Build it with `Reduction.create` (or let `Model` do it).

  Attributes:
    method: the registered name.
    options: the method's `Options`.
    geometry: the model it was checked against.
    spec: the spec's keys (without "method") it was built from, frozen.
  """
  method: str = "none"
  options: Any = None
  geometry: Geometry = Geometry(0, 0)
  spec: tuple = ()  # the spec's keys it was built from, frozen (`freeze`)

  @property
  def impl(self) -> Method:
    from tps_jax.methods import registry  # pylint: disable=g-import-not-at-top
    return registry.get(self.method)

  @property
  def learned(self) -> bool:
    return self.impl.learned

  @property
  def keep_ratios(self) -> tuple[float, ...]:
    return self.impl.keep_ratios(self.options)

  @property
  def stage_blocks(self) -> tuple[int, ...]:
    return self.impl.stage_blocks(self.options)

  @property
  def uses_probe(self) -> bool:
    return self.impl.uses_probe(self.options)

  @property
  def declares_tokens(self) -> bool:
    """Whether the method declares its token counts (`Method.tokens`); else the model reads
    them from a trace (`VisionTransformer.tokens`)."""
    return declares(self.impl, "tokens")

  def tokens(self) -> tuple[tuple[int, int, int], ...]:
    """Per block, the tokens (the prefix included) its attention runs on, its MLP runs on, and
    it leaves, at inference, as the method declares them (`Method.tokens`). For any method,
    declared or not, use the model's `VisionTransformer.tokens()`."""
    if not self.declares_tokens:
      raise ValueError(f"method {self.method!r} declares no tokens(); read them from the "
                       f"model: model.tokens().")
    p = self.geometry.prefix
    return tuple(tuple(n + p for n in t) for t in self.impl.tokens(self.options, self.geometry))

  def tokens_per_block(self) -> tuple[int, ...]:
    """Per block, the tokens (the prefix included) its MLP runs on, at inference."""
    return tuple(t[1] for t in self.tokens())

  def summary(self) -> dict[str, Any]:
    return {"method": self.method, **self.impl.summary(self.options)}

  @classmethod
  def create(cls, spec: "Reduction | Mapping[str, Any] | str | None", *, depth: int,
             num_patches: int, prefix: int = 1, has_cls: bool | None = None,
             has_probe: bool = False) -> "Reduction":
    """A validated plan for a ViT of `depth` blocks with `num_patches` reducible tokens.

    Args:
      spec: a Reduction (re-checked against this geometry), a method name, None (dense), or
        a mapping with "method" and that method's keys (`tps_jax.methods.get(name).options`).
      depth, num_patches, prefix, has_cls, has_probe: the `Geometry` (has_cls defaults to
        prefix > 0).
    Returns:
      The Reduction. Raises ValueError naming what cannot work.
    """
    geo = Geometry(int(depth), int(num_patches), int(prefix),
                   prefix > 0 if has_cls is None else bool(has_cls), bool(has_probe))
    from tps_jax.methods import registry  # pylint: disable=g-import-not-at-top
    if isinstance(spec, Reduction):
      method = registry.get(spec.method)
      return cls(spec.method, method.revalidate(spec.options, geo, dict(spec.spec)), geo,
                 spec.spec)
    if spec is None:
      spec = {"method": "none"}
    elif isinstance(spec, str):
      spec = {"method": spec}
    spec = dict(spec)
    name = spec.pop("method", "none")
    method = registry.get(name)
    return cls(name, method.options(spec, geo), geo, freeze(spec))
