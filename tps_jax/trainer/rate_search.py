"""DiffRate's differentiable search of per-block token counts for a MACs target (ICCV 2023).

Over a frozen dense ViT with a cls token, every block i gets two distributions over
candidate kept counts (prune and merge; logits `arch[i]["prune"]`, `arch[i]["merge"]`, one
per candidate N0, N0 - 1, ..., 1 patch tokens; block 0 has the single candidate N0, as the
authors'). The search forward is the authors' training forward with static shapes: the
sequence keeps all N0 + 1 tokens and carries a straight-through 0/1 mask instead of
dropping them. In each block, after the (policy-masked, size-biased) attention:

  sort by cls attention; kept = ceil(E[candidate]) + 1 (straight-through ceil);
  prune: mask the tokens in [kept, live) (straight-through: the mask's gradient is that of
         P(candidate >= j)); merge: the tokens in [kept_m, mid) average into their most
         similar token before kept_m (an unweighted mean; sizes weighted by the similarity,
         at least 1) and are masked.

The loss is the cross-entropy plus `lamb * ((macs - target) / unit) ** 2`, with the
authors' MACs proxy (attention on the tokens entering the block, MLP on those leaving it,
a straight-through min). Only the distributions learn (AdamW, cosine learning rate). The
result is a schedule, `prune_kept` / `merge_kept` per block in patch tokens (cls excluded),
that `Reduction` takes for method "diffrate", and that `to_stages` turns into the stage
locations and keep counts of any staged method (eTPS, top-k, EViT, dTPS).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tps_jax import methods, ops
from tps_jax.models import layers
from tps_jax.models.vit import Encoder, VisionTransformer


def _ste(value: jax.Array, grad_of: jax.Array) -> jax.Array:
  """`value` forward, the gradient of `grad_of` backward."""
  return grad_of + jax.lax.stop_gradient(value - grad_of)


def candidates(num_patches: int, block: int) -> jax.Array:
  """Kept-count candidates of a block (patch tokens): N0..1, block 0 only N0 (theirs)."""
  return jnp.arange(num_patches, 0, -1, dtype=jnp.float32) if block else \
      jnp.asarray([num_patches], jnp.float32)


def init_arch(num_patches: int, depth: int) -> list[dict[str, jax.Array]]:
  """Zero logits (uniform distributions), as the authors start."""
  return [{k: jnp.zeros(candidates(num_patches, i).shape, jnp.float32)
           for k in ("prune", "merge")} for i in range(depth)]


def kept_number(logits: jax.Array, cands: jax.Array) -> jax.Array:
  """ceil(E[candidate]) + 1 (cls), straight-through: the gradient of the expectation."""
  e = jnp.dot(cands, jax.nn.softmax(logits))
  return _ste(jnp.ceil(e), e) + 1.0


def token_mask(logits: jax.Array, cands: jax.Array, kept: jax.Array, upto: jax.Array,
               t: int) -> jax.Array:
  """(T,) 0 on [kept, upto), else 1, with the gradient of P(kept >= j + 1) (theirs)."""
  prob = jax.nn.softmax(logits)
  j = jnp.arange(t, dtype=jnp.float32)
  token_prob = jnp.sum(prob[:, None] * (j[None, :] < cands[:, None] + 1.0), axis=0)
  hard = 1.0 - ((j >= jnp.floor(kept)) & (j < upto)).astype(jnp.float32)
  return _ste(hard, token_prob)


def _ste_min(n, a, b):
  """min(n, a, b) forward; backward the whole gradient to a and to b, none to n (theirs)."""
  return _ste(jnp.minimum(jnp.minimum(n, a), b), a + b)


def _capture_tokens(model: VisionTransformer, params, images) -> jax.Array:
  """The tokens entering the Transformer (embedding, cls, position): (B, T, D)."""
  seen = {}

  def grab(next_fun, args, kwargs, context):
    if isinstance(context.module, Encoder) and context.method_name == "__call__":
      seen["x"] = args[0]
      raise _Captured()
    return next_fun(*args, **kwargs)

  try:
    with nn.intercept_methods(grab):
      model.apply({"params": params}, images)
  except _Captured:
    pass
  return seen["x"]


class _Captured(Exception):
  pass


def _block(model: VisionTransformer) -> layers.Encoder1DBlock:
  """The model's own block (inference, einsum attention: the search needs the whole matrix)."""
  return layers.Encoder1DBlock(mlp_dim=model.mlp_dim, num_heads=model.num_heads,
                               dtype=model.dtype, layer_norm_eps=model.layer_norm_eps,
                               attention="einsum", gelu=model.gelu)


def search_forward(model: VisionTransformer, params, arch, images):
  """The authors' training forward: (logits (B, classes), macs (scalar), kept (depth, 2))."""
  if not model.has_cls:
    raise ValueError("DiffRate's search scores tokens by cls attention: the model needs a cls "
                     "token (pool_type 'tok').")
  if model.scan:
    raise ValueError("the rate search reads per-block parameters: build the model with "
                     "scan=False (the same checkpoint loads).")
  x = _capture_tokens(model, params, images)
  b, t, d = x.shape
  n0 = t - 1
  size = jnp.ones((b, t), jnp.float32)
  mask = jnp.ones((b, t), jnp.float32)
  live = jnp.asarray(t, jnp.float32)  # tokens not masked (cls included), the same per example
  macs_n = jnp.asarray(t, jnp.float32)
  macs = 0.0
  kept_log = []
  block = _block(model)
  for i in range(model.depth):
    run = functools.partial(block.apply, {"params": params["Transformer"][f"encoderblock_{i}"]})
    # the block's first half under the mask, with the size bias (the authors' attention)
    x, info = run(x, ops.proportional_attention_bias(size), mask, method="attend_matrix")
    cls_attn = jnp.mean(info.probs[:, :, 0, 1:], axis=1)
    order = jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                             1 + jnp.argsort(-jax.lax.stop_gradient(cls_attn), axis=1,
                                             stable=True).astype(jnp.int32)], axis=1)
    x = jnp.take_along_axis(x, order[..., None], axis=1)
    size = jnp.take_along_axis(size, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    cands = candidates(n0, i)
    prune_kept = kept_number(arch[i]["prune"], cands)
    pm = token_mask(arch[i]["prune"], cands, prune_kept, live, t)
    mask = jnp.where(prune_kept < live, mask * pm[None], mask)
    mid = jnp.minimum(live, jnp.floor(prune_kept))
    merge_kept = kept_number(arch[i]["merge"], cands)
    mm = token_mask(arch[i]["merge"], cands, merge_kept, mid, t)
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
    # the authors' MACs proxy: attention on the tokens entering, MLP on those leaving
    macs = macs + 4 * macs_n * d * d + 2 * macs_n * macs_n * d
    macs_n = _ste_min(macs_n, prune_kept, merge_kept)
    macs = macs + 2 * macs_n * d * model.mlp_dim
    kept_log.append(jnp.stack([prune_kept, merge_kept]))
    x = run(x, method="feed")
  tr = params["Transformer"]
  x = nn.LayerNorm(epsilon=model.layer_norm_eps).apply({"params": tr["encoder_norm"]}, x)[:, 0]
  if model.rep_size:
    x = jnp.tanh(x @ params["pre_logits"]["kernel"] + params["pre_logits"]["bias"])
  logits = x @ params["head"]["kernel"] + params["head"]["bias"]
  return logits, macs, jnp.stack(kept_log)


def proxy_constant(model: VisionTransformer) -> float:
  """The MACs outside the blocks (embedding, head), added to the proxy's block MACs."""
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  parts = flops.breakdown(_dense(model))
  return float(parts["embedding"] + parts["head"] + parts["pool"])


def _dense(model: VisionTransformer) -> VisionTransformer:
  return model.clone(reduction=methods.Reduction.create(
      None, depth=model.depth, num_patches=model.num_reducible, prefix=model.num_prefix,
      has_cls=model.has_cls))


@dataclasses.dataclass
class SearchResult:
  prune_kept: tuple[int, ...]  # per block, patch tokens (cls excluded)
  merge_kept: tuple[int, ...]
  macs: float  # the proxy's MACs of the final schedule (blocks + embedding and head)
  history: list[dict[str, float]]

  def spec(self) -> dict[str, Any]:
    return {"method": "diffrate", "prune_kept": list(self.prune_kept),
            "merge_kept": list(self.merge_kept)}


def search(model: VisionTransformer, params, batches: Iterable[tuple[Any, Any]], *,
           target_macs: float, steps: int, lr: float = 0.01, min_lr: float = 0.001,
           lamb: float = 5.0, unit: float = 1e9, warmup_steps: int = 0,
           log: Callable[[str], None] = print, log_every: int = 50) -> SearchResult:
  """Searches per-block counts for `target_macs` (our count of one image's MACs).

  batches: (images NHWC float, integer labels) pairs, at least `steps` of them. The flops
  weight `lamb` is 0 for the first `warmup_steps` (the authors' warm-up epoch).
  """
  n0 = model.num_patches
  arch = init_arch(n0, model.depth)
  schedule = optax.cosine_decay_schedule(lr, max(steps, 1), alpha=min_lr / lr)
  tx = optax.adamw(schedule, weight_decay=0.0)
  opt_state = tx.init(arch)
  const = proxy_constant(model)

  def loss_fn(arch, params, images, labels, weight):
    logits, macs, kept = search_forward(model, params, arch, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    flops_loss = ((macs + const - target_macs) / unit) ** 2
    return ce + weight * flops_loss, (ce, macs + const, kept)

  @jax.jit
  def step(arch, opt_state, params, images, labels, weight):  # params an argument: not baked in
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(arch, params, images, labels,
                                                                  weight)
    updates, opt_state = tx.update(grads, opt_state, arch)
    return optax.apply_updates(arch, updates), opt_state, loss, aux

  history = []
  it = iter(batches)
  for s in range(steps):
    images, labels = next(it)
    weight = 0.0 if s < warmup_steps else lamb
    arch, opt_state, loss, (ce, macs, kept) = step(arch, opt_state, params, jnp.asarray(images),
                                                    jnp.asarray(labels), weight)
    if (s + 1) % log_every == 0 or s == steps - 1:
      row = {"step": s + 1, "loss": float(loss), "ce": float(ce), "macs": float(macs)}
      history.append(row)
      log(f"  search step {s + 1}/{steps}: ce {row['ce']:.4f}  proxy {row['macs'] / 1e6:.2f} "
          f"MMACs (target {target_macs / 1e6:.2f})")
  kept = np.asarray(jax.device_get(jnp.stack(
      [jnp.stack([kept_number(a["prune"], candidates(n0, i)),
                  kept_number(a["merge"], candidates(n0, i))]) for i, a in enumerate(arch)])))
  prune = tuple(int(v) - 1 for v in kept[:, 0])
  merge = tuple(int(v) - 1 for v in kept[:, 1])
  return SearchResult(prune, merge, float(history[-1]["macs"]) if history else float("nan"),
                      history)


def to_stages(prune_kept, merge_kept, num_patches: int) -> dict[str, tuple[int, ...]]:
  """A searched schedule as stages of a staged method: the blocks where the tokens left
  (min of the tokens before, the pruning and the merging count) fall (`locations`) and the
  patch tokens kept there (`keep_counts`)."""
  if len(prune_kept) != len(merge_kept):
    raise ValueError(f"prune_kept has {len(prune_kept)} blocks, merge_kept {len(merge_kept)}.")
  plan = methods.Reduction.create(
      {"method": "diffrate", "prune_kept": prune_kept, "merge_kept": merge_kept},
      depth=len(prune_kept), num_patches=num_patches).options
  return {"locations": plan.locations, "keep_counts": plan.keep_counts}
