"""VisionZip (Yang et al., CVPR 2025): at one block's output, keep the `dominant` tokens the
attention favours, and merge the rest into `contextual` tokens by key similarity
(docs/method.md, section 11).

The dominant tokens are the top-scored by the block's attention (the cls row summed over
heads, as the authors'). The others, in sequence order, give `contextual` targets, one every
`step = max(1, R // contextual)` of the R remaining; every other remaining token joins the
target whose head-mean key is most similar (cosine), and a target becomes itself plus the mean
of the tokens that joined it. The sequence leaves as the prefix, the dominant tokens in their
order, then the contextual tokens.

The authors reduce a vision tower's output for the LLM (LLaVA's layer -2); `layer` is that
block (default depth - 2), and the blocks after it run on the reduced tokens. On models with no
cls token the score is the attention each token receives (`score`, as the attention stages).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tps_jax import ops
from tps_jax.methods import stages
from tps_jax.methods.base import Method, check_keys
from tps_jax.methods.registry import register
from tps_jax.methods.scored import attend_for, attention_scores, resolve_score

CONTEXTUAL_SHARE = 0.16  # contextual / kept in the paper's settings: 10 of 64, 20 of 128, 30 of 192


@dataclasses.dataclass(frozen=True)
class VisionZipOptions:
  """Attributes:
    layer: the block at whose output the tokens are reduced.
    dominant: reducible tokens kept by attention (the prefix, e.g. cls, is kept besides; the
      authors' `dominant` counts the cls token, so theirs is this plus one).
    contextual: tokens the rest are merged into.
    score: the attention score of the dominant tokens ("cls", "received", "mean_query",
      "map_probe").
  """
  layer: int
  dominant: int
  contextual: int
  score: str = "cls"


def contextual_targets(remaining: int, contextual: int) -> tuple[np.ndarray, np.ndarray]:
  """Static positions, among the `remaining` tokens, of the targets (one every
  max(1, remaining // contextual), the first `contextual`) and of the tokens merged into them."""
  if contextual == 0:
    return np.zeros((0,), np.int32), np.arange(remaining, dtype=np.int32)
  targets = np.arange(0, remaining, max(1, remaining // contextual), dtype=np.int32)[:contextual]
  return targets, np.setdiff1d(np.arange(remaining, dtype=np.int32), targets)


def zip_tokens(x: jax.Array, scores: jax.Array, keys: jax.Array, positions: jax.Array,
               dominant: int, contextual: int, *, num_patches: int, prefix: int = 1,
               size: jax.Array | None = None) -> stages.StageOut:
  """VisionZip's reduction of x (B, P + N, C): `dominant` tokens by `scores` (B, N), the rest
  merged into `contextual` tokens by the cosine similarity of their `keys` (B, N, d).
  positions (B, N) int32, size (B, P + N) or None -> stages.StageOut of P + dominant +
  contextual tokens."""
  b, n = scores.shape
  if not 0 <= dominant <= n or not 0 <= contextual <= n - dominant:
    raise ValueError(f"VisionZip keeps dominant={dominant} and contextual={contextual} tokens "
                     f"of {n}: need dominant <= {n} and contextual <= {n} - dominant.")
  keep_idx, rest_idx = ops.topk_split(scores, dominant)
  keep_idx, rest_idx = jnp.sort(keep_idx, axis=1), jnp.sort(rest_idx, axis=1)  # sequence order
  targets, merged = contextual_targets(n - dominant, contextual)
  target_idx, merged_idx = rest_idx[:, targets], rest_idx[:, merged]
  head, tokens = x[:, :prefix], x[:, prefix:]
  take = lambda a, idx: jnp.take_along_axis(a, idx, axis=1)
  metric = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
  if merged.size and contextual:
    similarity = jnp.einsum("bmd,btd->bmt", ops.gather_tokens(metric, merged_idx),
                            ops.gather_tokens(metric, target_idx))
    assign = jnp.argmax(similarity, axis=-1)  # (B, M) the target each merged token joins
  else:
    assign = jnp.full((b, merged.size), -1, jnp.int32)  # nothing to merge, or dropped
  onehot = jax.nn.one_hot(assign, contextual, dtype=x.dtype)  # (B, M, C); -1 rows are zero
  counts = jnp.maximum(jnp.sum(onehot, axis=1), 1)[..., None]
  pooled = jnp.einsum("bmt,bmc->btc", onehot, ops.gather_tokens(tokens, merged_idx)) / counts
  new_tokens = jnp.concatenate(
      [ops.gather_tokens(tokens, keep_idx), ops.gather_tokens(tokens, target_idx) + pooled], 1)

  target_pos, merged_pos = take(positions, target_idx), take(positions, merged_idx)
  new_pos = jnp.concatenate([take(positions, keep_idx), target_pos], axis=1)
  slots = jnp.where(assign >= 0, prefix + dominant + assign, -1)  # where each merged token went
  host_pos = jnp.where(assign >= 0, take(target_pos, jnp.maximum(assign, 0)), -1)
  hosts = stages.host_map(jnp.where(assign >= 0, merged_pos, -1), host_pos, num_patches)
  order = jnp.concatenate([keep_idx, target_idx, merged_idx], axis=1)  # a permutation of N
  kept = dominant + contextual
  target = jnp.concatenate([jnp.broadcast_to(prefix + jnp.arange(kept, dtype=jnp.int32),
                                             (b, kept)), slots.astype(jnp.int32)], axis=1)
  new_index = jnp.concatenate(
      [jnp.broadcast_to(jnp.arange(prefix, dtype=jnp.int32), (b, prefix)),
       take(target, jnp.argsort(order, axis=1))], axis=1)
  new_size = None
  if size is not None:
    tok_size = size[:, prefix:]
    joined = jnp.einsum("bmt,bm->bt", onehot.astype(size.dtype), take(tok_size, merged_idx))
    new_size = jnp.concatenate([size[:, :prefix], take(tok_size, keep_idx),
                                take(tok_size, target_idx) + joined], axis=1)
  return stages.StageOut(jnp.concatenate([head, new_tokens], axis=1), new_pos,
                         ops.indices_to_mask(new_pos, num_patches), hosts, new_index, new_size)


@register("visionzip")
class VisionZip(Method):
  """Dominant tokens by attention, the rest merged into contextual tokens, at one block."""
  Options = VisionZipOptions
  merges = True  # a contextual token stands for several patches

  def options(self, spec, geo):
    check_keys(self.name, spec, ("layer", "dominant", "contextual", "keep_ratio",
                                 "contextual_share", "score"))
    n = geo.num_patches
    layer = int(spec.get("layer", max(0, geo.depth - 2)))
    if not 0 <= layer < geo.depth:
      raise ValueError(f"visionzip: layer={layer} is not a block of this model "
                       f"[0, {geo.depth}).")
    counts = {"dominant", "contextual"} & set(spec)
    if counts and "keep_ratio" in spec:
      raise ValueError("visionzip: give keep_ratio or dominant and contextual, not both.")
    if counts:
      if counts != {"dominant", "contextual"}:
        raise ValueError("visionzip: give both dominant and contextual token counts.")
      dominant, contextual = int(spec["dominant"]), int(spec["contextual"])
    else:
      ratio, share = float(spec.get("keep_ratio", 1 / 3)), float(
          spec.get("contextual_share", CONTEXTUAL_SHARE))
      if not 0 < ratio <= 1 or not 0 <= share < 1:
        raise ValueError(f"visionzip: keep_ratio must be in (0, 1] and contextual_share in "
                         f"[0, 1), got {ratio} and {share}.")
      kept = max(1, round(ratio * n))
      contextual = 0 if kept == n else min(kept - 1, max(1, round(share * kept)))
      dominant = kept - contextual
    if not 0 <= dominant <= n or not 0 <= contextual <= n - dominant or dominant + contextual < 1:
      raise ValueError(f"visionzip: dominant={dominant} and contextual={contextual} must keep "
                       f"between 1 and {n} of the {n} patch tokens.")
    return VisionZipOptions(layer, dominant, contextual,
                            resolve_score(spec.get("score", "auto"), geo.has_cls, geo.has_probe))

  def acts_at(self, o, i):
    return i == o.layer

  def uses_probe(self, o):
    return o.score == "map_probe"

  def block(self, o, i, block, state, ctx):
    y, info = attend_for(block, o.score, ctx)(state.x)
    x = block.feed(y)
    # The authors' metric is the block's keys averaged over heads, taken on its input.
    st = ctx.checkpoint(lambda x, scores, keys, positions, size: zip_tokens(
        x, scores, keys, positions, o.dominant, o.contextual, num_patches=ctx.num_patches,
        prefix=ctx.prefix, size=size))(
            x, attention_scores(info, o.score, ctx.prefix), info.keys[:, ctx.prefix:],
            state.positions, state.size)
    return state.after_stage(st, ctx)

  def example(self, geo):
    return {"method": self.name, "keep_ratio": 1 / 3}

  def identity(self, geo):
    return {"method": self.name, "keep_ratio": 1.0}

  def summary(self, o):
    return {"layer": o.layer, "dominant": o.dominant, "contextual": o.contextual}
