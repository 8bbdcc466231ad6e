"""Straight-through hard Gumbel-Softmax (dTPS / DynamicViT decisions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast


def gumbel_softmax_hard(logits: jax.Array, rng: jax.Array | None = None,
                        temperature: float = 1.0, axis: int = -1) -> jax.Array:
  """One-hot samples whose gradient is that of the soft sample.

  Forward: `one_hot(argmax((logits + g) / temperature))` with `g ~ Gumbel(0, 1)`;
  backward: the gradient of `softmax((logits + g) / temperature)`, as PyTorch's
  `F.gumbel_softmax(hard=True)`.

  Args:
    logits: (..., K) unnormalised log-probabilities (float32 recommended).
    rng: a PRNG key; None turns the noise off (decisions by argmax of logits).
    temperature: > 0.
    axis: the category axis.

  Returns:
    Same shape and dtype as `logits`, exactly 0/1 in the forward pass.
  """
  validate.check_positive("temperature", temperature)
  if jnp.ndim(logits) == 0:
    raise ValueError("logits must have a category axis, got a scalar.")
  z = upcast(logits)
  if rng is not None:
    z = z + jax.random.gumbel(rng, z.shape, z.dtype)
  soft = jax.nn.softmax(z / temperature, axis=axis)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=axis), z.shape[axis], axis=axis,
                        dtype=z.dtype)
  return (hard - jax.lax.stop_gradient(soft) + soft).astype(logits.dtype)
