"""Token squeezing: fuse each pruned token into its most similar reserved token.

docs/method.md, section 1. A pruned token `i` picks its host `j` as the reserved token of
highest cosine similarity (unidirectional nearest neighbour); each host becomes
the similarity-weighted average of itself (weight `e`) and its guests (weights
`exp(c[i, j])`). Host matching is a masked one-hot: argmax -> one_hot -> einsum,
so shapes are static and nothing is scattered.

Two forms share that math:
- `squeeze`: inference form on gathered sets, (B, Nr, C), (B, Np, C) -> (B, Nr, C).
- `squeeze_masked`: training form on the full fixed-shape sequence with 0/1
  keep / pruned masks, (B, N, C) -> (B, N, C).

Similarities and weights are computed in float32; outputs have the input dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast

# The weight a host gives itself: exp(1), i.e. exp of its cosine with itself.
SELF_WEIGHT = math.e
# Similarity given to disallowed hosts in the training form (the authors' -100).
MASKED_SIMILARITY = -100.0
NORM_EPS = 1e-6


class HostMatch(NamedTuple):
  """The result of matching pruned tokens to hosts.

  host:   (B, Ng) int32 index of each guest's host; -1 where it has none.
  weight: (B, Ng, Nh) float32 `m[i, j] * exp(c[i, j])`, zero off the host.
  """
  host: jax.Array
  weight: jax.Array


def _inverse_norm(x: jax.Array) -> jax.Array:
  """1 / (|x| + 1e-6) over channels, (B, N, C) -> (B, N), finite gradient at x = 0."""
  sq = jnp.sum(x * x, axis=-1)
  norm = jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)
  return 1.0 / (norm + NORM_EPS)


def cosine_similarity(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pairwise cosine, (B, Na, C), (B, Nb, C) -> (B, Na, Nb), at least float32.

  Computed as `(a . b) / ((|a| + eps)(|b| + eps))`: the same value as normalising
  first, but the dot runs on the raw tokens, which keeps XLA's fast matmul path.
  """
  a, b = upcast(a), upcast(b)
  dots = jnp.einsum("bic,bjc->bij", a, b)
  return dots * _inverse_norm(a)[:, :, None] * _inverse_norm(b)[:, None, :]


def _one_hot_weights(sim: jax.Array, guest: jax.Array | None) -> HostMatch:
  """Hosts as argmax of `sim` (B, Ng, Nh); `guest` (B, Ng) scales each row."""
  host = jnp.argmax(sim, axis=-1)
  onehot = jax.nn.one_hot(host, sim.shape[-1], dtype=sim.dtype)  # (B, Ng, Nh)
  if guest is not None:
    onehot = onehot * guest[..., None]
  return HostMatch(host.astype(jnp.int32), onehot * jnp.exp(sim))


def fuse(hosts: jax.Array, guests: jax.Array, weight: jax.Array) -> jax.Array:
  """out_j = (e * hosts_j + sum_i w_ij guests_i) / (e + sum_i w_ij).

  hosts (B, Nh, C), guests (B, Ng, C), weight (B, Ng, Nh) -> (B, Nh, C) float32.
  Hosts with no guests come back bit-exact.
  """
  hosts = upcast(hosts)
  total = jnp.sum(weight, axis=1)[..., None]  # (B, Nh, 1)
  num = SELF_WEIGHT * hosts + jnp.einsum("bij,bic->bjc", weight, upcast(guests))
  # A token without guests is passed through exactly (e * x / e can be off by an ulp).
  return jnp.where(total > 0, num / (SELF_WEIGHT + total), hosts)


def _check_sets(reserved, pruned):
  rs = validate.check_rank("reserved", reserved, 3, "(B, Nr, C)")
  ps = validate.check_rank("pruned", pruned, 3, "(B, Np, C)")
  validate.check_same("batch sizes", ("reserved", "pruned"), (rs, ps), (rs[0], ps[0]))
  validate.check_same("channel counts", ("reserved", "pruned"), (rs, ps), (rs[2], ps[2]))
  return rs, ps


def match_hosts(reserved: jax.Array, pruned: jax.Array,
                temperature: float = 1.0) -> HostMatch:
  """Host of each pruned token among the reserved ones (inference form).

  reserved (B, Nr, C), pruned (B, Np, C) -> HostMatch(host (B, Np), weight (B, Np, Nr)).
  With Nr = 0 every host is -1 and the weights are empty.
  """
  rs, ps = _check_sets(reserved, pruned)
  validate.check_positive("temperature", temperature)
  b, nr, _ = rs
  np_ = ps[1]
  if nr == 0 or np_ == 0:
    return HostMatch(jnp.full((b, np_), -1, jnp.int32), jnp.zeros((b, np_, nr), jnp.float32))
  sim = cosine_similarity(pruned, reserved) / temperature  # (B, Np, Nr)
  return _one_hot_weights(sim, None)


def squeeze_with_hosts(reserved: jax.Array, pruned: jax.Array,
                       temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`squeeze` that also returns each pruned token's host index (B, Np), -1 if none."""
  match = match_hosts(reserved, pruned, temperature)
  if match.weight.size == 0:  # nothing pruned, or nothing to host it
    return reserved, match.host
  out = fuse(reserved, pruned, match.weight)
  return out.astype(reserved.dtype), match.host


def squeeze(reserved: jax.Array, pruned: jax.Array, temperature: float = 1.0) -> jax.Array:
  """Squeezes pruned tokens into their hosts (inference form, docs/method.md, section 1).

  Args:
    reserved: (B, Nr, C) tokens that stay.
    pruned: (B, Np, C) tokens that go; Np may be 0.
    temperature: divides the cosine similarity; > 0.

  Returns:
    (B, Nr, C) in `reserved`'s dtype. A reserved token that hosts nobody is
    returned unchanged.
  """
  return squeeze_with_hosts(reserved, pruned, temperature)[0]


def match_hosts_masked(x: jax.Array, keep, pruned, temperature: float = 1.0) -> HostMatch:
  """Host of each token pruned at this stage among the kept ones (training form).

  x (B, N, C), keep / pruned (B, N) or (B, N, 1) 0/1 ->
  HostMatch(host (B, N), weight (B, N, N)); host is -1 where a token is not
  pruned here or has no kept token to go to.
  """
  b, n, _ = validate.check_rank("x", x, 3, "(B, N, C)")
  keep = validate.token_mask("keep", keep, b, n)
  pruned = validate.token_mask("pruned", pruned, b, n)
  validate.check_disjoint("keep", keep, "pruned", pruned)
  validate.check_positive("temperature", temperature)
  if n == 0:
    return HostMatch(jnp.zeros((b, 0), jnp.int32), jnp.zeros((b, 0, 0), jnp.float32))

  sim = cosine_similarity(x, x) / temperature  # (B, N, N)
  live_host = (keep > 0.5)[:, None, :] & ~jnp.eye(n, dtype=bool)[None]  # (B, 1|N, N)
  sim = jnp.where(live_host, sim, MASKED_SIMILARITY)
  match = _one_hot_weights(sim, pruned.astype(sim.dtype))
  # The authors' code would send a token with no kept token anywhere to
  # host 0 at weight exp(-100); we give it no host at all.
  has_host = jnp.take_along_axis(live_host, match.host[..., None], axis=-1)[..., 0]
  weight = match.weight * has_host[..., None]
  host = jnp.where(has_host & (pruned > 0.5), match.host, -1)
  return HostMatch(host, weight)


def squeeze_masked_with_hosts(x: jax.Array, keep, pruned,
                              temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`squeeze_masked` that also returns the host index of each token (B, N), -1 if none."""
  match = match_hosts_masked(x, keep, pruned, temperature)
  return fuse(x, x, match.weight).astype(x.dtype), match.host


def squeeze_masked(x: jax.Array, keep, pruned, temperature: float = 1.0) -> jax.Array:
  """Squeezes with fixed shapes, for training with learned decisions (docs/method.md, section 1).

  Args:
    x: (B, N, C) all tokens.
    keep: (B, N) or (B, N, 1) 0/1, tokens live after this stage (may carry a
      straight-through gradient).
    pruned: (B, N) or (B, N, 1) 0/1, tokens live before and dropped at this
      stage. Tokens dropped earlier are 0 in both and take no part.
    temperature: divides the cosine similarity; > 0.

  Returns:
    (B, N, C) in `x`'s dtype: hosts updated, every other token unchanged.
  """
  return squeeze_masked_with_hosts(x, keep, pruned, temperature)[0]
