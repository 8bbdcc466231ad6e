"""PiToMe: merging that protects isolated tokens (Tran et al., NeurIPS 2024).

Operator of the authors' `algo/pitome/merge.py` (hchautran/PiToMe) for vision
models, with static shapes. Over the reducible tokens (cls excluded), with
`metric` the keys averaged over heads:

  sim    = cosine similarities (T, T)
  energy = mean_j ELU(sim_ij - margin)            one score per token
  order  = tokens by energy, highest first

Two matchings, as the authors' DeiT patch uses them (the first half of the
blocks the first, the rest the second):

  bsm     ToMe's bipartite matching with the sets drawn from `order`: A = order
          at even places, B = odd places; the `r` A tokens with the best
          matches merge into their B match, the other A tokens stay.
  pitome  only the 2r highest-energy tokens may merge: A = order[0:2r:2],
          B = order[1:2r:2], every A token into its most similar B token; the
          T - 2r low-energy (isolated) tokens are protected.

The result is `new_index` (B, T): each token's place in the output, in the
authors' order ([the A tokens that stay, or the protected ones, then B]). A
size-weighted merge by that index (`ops.merge.merge_by_index`) is the authors'
`merge_wavg`. `r` and the output length are Python ints: one trace.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast
from tps_jax.ops.merge import normalize

MATCHINGS = ("bsm", "pitome")


def energy_scores(metric: jax.Array, margin: float, alpha: float = 1.0):
  """(B, T, C) -> cosine similarities (B, T, T) and energies (B, T), float32."""
  m = upcast(metric)
  m = normalize(m)
  sim = jnp.einsum("btc,bsc->bts", m, m)
  return sim, jnp.mean(jax.nn.elu(sim - margin, alpha), axis=-1)


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
  return jnp.take_along_axis(a, idx, axis=-1)


def _submatrix(sim: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """sim (B, T, T)[b, rows[b]][:, cols[b]] -> (B, R, C)."""
  out = jnp.take_along_axis(sim, rows[..., None], axis=1)
  return jnp.take_along_axis(out, cols[:, None, :], axis=2)


def pitome_match(metric: jax.Array, r: int, *, margin: float, matching: str = "pitome",
                 alpha: float = 1.0) -> jax.Array:
  """Where each of T tokens goes when PiToMe merges `r` of them away.

  Args:
    metric: (B, T, C) the reducible tokens' features (keys averaged over heads); no
      gradient flows through them.
    r: tokens merged away, a Python int: at most T // 2 for "pitome", (T + 1) // 2 for "bsm".
    margin: the energy's margin (the default schedule: docs/method.md section 5).
    matching: "bsm" or "pitome" (see above).
    alpha: the ELU's alpha.

  Returns:
    new_index (B, T) int32 in [0, T - r): each token's output position.
  """
  if matching not in MATCHINGS:
    raise ValueError(f"unknown PiToMe matching {matching!r}; expected one of {MATCHINGS}.")
  b, t, _ = validate.check_rank("metric", metric, 3, "(B, T, C)")
  most = t // 2 if matching == "pitome" else (t + 1) // 2
  r = validate.check_count("r", r, 0, most, f"PiToMe ({matching}) on {t} tokens")
  sim, energy = energy_scores(jax.lax.stop_gradient(metric), margin, alpha)
  _, order = jax.lax.top_k(energy, t)  # highest energy first
  order = order.astype(jnp.int32)
  rows = jnp.arange(b)[:, None]
  if matching == "bsm":
    a_idx, b_idx = order[:, ::2], order[:, 1::2]
    scores = _submatrix(sim, a_idx, b_idx)  # (B, Ta, Tb)
    node_max = jnp.max(scores, axis=-1)
    node_idx = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    _, edges = jax.lax.top_k(node_max, a_idx.shape[1])  # best matches first
    edges = edges.astype(jnp.int32)
    stay, src = edges[:, r:], edges[:, :r]
    dst = _take(node_idx, src)
    kept = _take(a_idx, stay)  # in the authors' order: by match quality, best first
    merged_a = _take(a_idx, src)
  else:
    a_idx, b_idx = order[:, :2 * r:2], order[:, 1:2 * r:2]
    dst = jnp.argmax(_submatrix(sim, a_idx, b_idx), axis=-1).astype(jnp.int32)  # (B, r)
    kept = order[:, 2 * r:]  # the protected tokens, highest energy first
    merged_a = a_idx
  k = kept.shape[1]
  new_index = jnp.zeros((b, t), jnp.int32)
  new_index = new_index.at[rows, kept].set(jnp.arange(k, dtype=jnp.int32)[None])
  new_index = new_index.at[rows, b_idx].set(k + jnp.arange(b_idx.shape[1], dtype=jnp.int32)[None])
  return new_index.at[rows, merged_a].set(k + dst)
