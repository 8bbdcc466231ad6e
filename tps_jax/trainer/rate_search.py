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

The forward runs through the model's own encoder, as method "diffrate_search"
(tps_jax/methods/diffrate.py), whose blocks hold the distributions.

The loss is the cross-entropy plus `lamb * ((macs - target) / unit) ** 2`, with the
authors' MACs proxy (attention on the tokens entering the block, MLP on those leaving it,
a straight-through min). Only the distributions learn (AdamW, cosine learning rate). The
result is a schedule, `prune_kept` / `merge_kept` per block in patch tokens (cls excluded),
that `Reduction` takes for method "diffrate", and that `to_stages` turns into the stage
locations and keep counts of any staged method (eTPS, top-k, EViT, dTPS).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tps_jax import methods, ops
from tps_jax.models.vit import VisionTransformer


# The search's pure math lives with DiffRate's other operators (ops/diffrate.py).
candidates, kept_number = ops.diffrate.rate_candidates, ops.diffrate.kept_number


def init_arch(num_patches: int, depth: int) -> list[dict[str, jax.Array]]:
  """Zero logits (uniform distributions), as the authors start."""
  return [{k: jnp.zeros(candidates(num_patches, i).shape, jnp.float32)
           for k in ("prune", "merge")} for i in range(depth)]


def search_model(model: VisionTransformer) -> VisionTransformer:
  """`model` with DiffRate's search forward at every block (method "diffrate_search")."""
  return model.clone(reduction={"method": "diffrate_search"})


def search_forward(model: VisionTransformer, params, arch, images):
  """The authors' training forward, run by the model's own encoder (method
  "diffrate_search"): (logits (B, classes), macs (scalar), kept (depth, 2)).

  arch: per block {"prune", "merge"} logits over its candidate counts (`init_arch`); params:
  the dense model's, frozen (they take no part in the search's parameters)."""
  if not model.has_cls:
    raise ValueError("DiffRate's search scores tokens by cls attention: the model needs a cls "
                     "token (pool_type 'tok').")
  if model.scan:
    raise ValueError("the rate search takes per-block distributions: build the model with "
                     "scan=False (the same checkpoint loads).")
  searching = search_model(model)
  tr = dict(params["Transformer"], **{f"rate_{i}": a for i, a in enumerate(arch)})
  logits, out = searching.apply({"params": {**params, "Transformer": tr}}, images)
  kept = jnp.stack(out["carry"]["kept"])  # (depth, 2): prune, merge (cls included)
  # The authors' MACs proxy: the attention on the tokens entering a block, the MLP on those
  # leaving it (a straight-through min).
  d, t = model.width, model.num_patches + 1
  macs_n, macs = jnp.asarray(t, jnp.float32), 0.0
  for prune_kept, merge_kept in kept:
    macs = macs + 4 * macs_n * d * d + 2 * macs_n * macs_n * d
    macs_n = ops.diffrate.ste_min(macs_n, prune_kept, merge_kept)
    macs = macs + 2 * macs_n * d * model.dims.mlp_dim
  return logits, macs, kept


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
