"""Argument checks shared by the operators.

Shapes are static under `jax.jit`, so every shape check runs at trace time and
raises a `ValueError` that names the argument and the shapes it saw. Value
checks (a 0/1 mask) can only run on concrete arrays, i.e. outside `jit`; under
a trace they are skipped.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def check_rank(name: str, x, rank: int, layout: str) -> tuple[int, ...]:
  """Returns `x`'s shape; raises if its rank is not `rank` (`layout` e.g. "(B, N, C)")."""
  shape = shape_of(x)
  if len(shape) != rank:
    raise ValueError(
        f"{name} must have rank {rank} {layout}, got shape {shape}.")
  return shape


def check_same(what: str, names: Sequence[str], shapes: Sequence[tuple[int, ...]],
               values: Sequence[int]) -> None:
  """Raises if `values` (one dimension of each argument) differ."""
  if len(set(values)) > 1:
    desc = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
    raise ValueError(f"{what} must agree, got {desc}.")


def check_count(name: str, k, low: int, high: int, context: str) -> int:
  """Checks that `k` is a Python int in [low, high] (a static count)."""
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)):
    raise ValueError(
        f"{name} must be a Python int (a static count), got {k!r} of type "
        f"{type(k).__name__}.")
  k = int(k)
  if not low <= k <= high:
    raise ValueError(f"{name}={k} is out of range [{low}, {high}] for {context}.")
  return k


def check_positive(name: str, value) -> None:
  """Checks a Python scalar > 0; traced values are accepted as they are."""
  if isinstance(value, (int, float, np.number)) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")


def _concrete(x) -> np.ndarray | None:
  """The value of `x` as numpy, or None when `x` is traced."""
  if isinstance(x, jax.core.Tracer):
    return None
  return np.asarray(x)


# Masks are 0/1 up to this rounding; a token is live where its mask is > 0.5.
MASK_ATOL = 1e-4


def token_mask(name: str, mask, batch: int, num_tokens: int) -> jax.Array:
  """Validates a per-token 0/1 mask given as (B, N) or (B, N, 1); returns (B, N).

  The dtype is kept when it is floating (so a straight-through mask keeps its
  gradient); boolean and integer masks become float32.
  """
  shape = shape_of(mask)
  if shape not in ((batch, num_tokens), (batch, num_tokens, 1)):
    raise ValueError(
        f"{name} must have shape (B, N)=({batch}, {num_tokens}) or "
        f"(B, N, 1)=({batch}, {num_tokens}, 1) to match the tokens, got {shape}.")
  value = _concrete(mask)
  # A straight-through mask is `hard - soft + soft`: 0/1 up to rounding.
  binary = np.isclose(value, 0, atol=MASK_ATOL) | np.isclose(value, 1, atol=MASK_ATOL) \
      if value is not None else None
  if value is not None and value.size and not np.all(binary):
    bad = value[~binary].ravel()[:3]
    raise ValueError(f"{name} must hold only 0 and 1, found values such as {bad.tolist()}.")
  mask = jnp.asarray(mask)
  if not jnp.issubdtype(mask.dtype, jnp.floating):
    mask = mask.astype(jnp.float32)
  return mask.reshape(batch, num_tokens)


def check_disjoint(name_a: str, a, name_b: str, b) -> None:
  """For concrete 0/1 masks, checks that no token is set in both."""
  va, vb = _concrete(a), _concrete(b)
  if va is not None and vb is not None and np.any((va > 0.5) & (vb > 0.5)):
    raise ValueError(
        f"{name_a} and {name_b} overlap: a token cannot be both kept and pruned "
        f"at the same stage ({int(np.sum((va > 0.5) & (vb > 0.5)))} such tokens).")
