"""Accumulation precision: at least float32, more if the input has more."""

import jax
import jax.numpy as jnp


def accum_dtype(x) -> jnp.dtype:
  """float32 for half-precision inputs; the input dtype when it is wider (float64)."""
  return jnp.promote_types(jnp.result_type(x), jnp.float32)


def upcast(x) -> jax.Array:
  """`x` in its accumulation dtype."""
  return jnp.asarray(x).astype(accum_dtype(x))
