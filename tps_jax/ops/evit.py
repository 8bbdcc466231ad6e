"""EViT fusion: the pruned tokens become one extra token (docs/method.md, section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tps_jax.ops import validate
from tps_jax.ops.dtypes import upcast


def evit_fuse(pruned: jax.Array, pruned_attn: jax.Array) -> jax.Array:
  """`sum_j a_j y_j` over pruned tokens, `a` the cls attention (not renormalised).

  pruned (B, Np, C), pruned_attn (B, Np) -> (B, 1, C) in `pruned`'s dtype
  (accumulated in float32). With Np = 0 the token is zero.
  """
  b, n, c = validate.check_rank("pruned", pruned, 3, "(B, Np, C)")
  ab, an = validate.check_rank("pruned_attn", pruned_attn, 2, "(B, Np)")
  validate.check_same("batch and token counts", ("pruned", "pruned_attn"),
                      ((b, n, c), (ab, an)), ((b, n), (ab, an)))
  fused = jnp.einsum("bn,bnc->bc", upcast(pruned_attn), upcast(pruned))
  return fused[:, None, :].astype(pruned.dtype)
