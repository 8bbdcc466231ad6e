"""Logical names of the activations' axes, which a trainer maps to mesh axes (big_vision's
`config.sharding_rules`, e.g. [("act_batch", ("data", "fsdp"))]).

  x = logical.constrain(x, logical.TOKENS)   # (B, N, D): ("act_batch", "act_len", "act_emb")

Outside `flax.linen.logical_axis_rules` (or without a mesh) a constraint does nothing, so the
model runs as it is anywhere; `tps_jax.trainer.sharding.Layout.trace` sets both while the
train step traces. Splitting the batch of every block's tokens over the data-parallel axes
lets XLA keep the activations split and reduce-scatter the gradients over FSDP.
"""

from __future__ import annotations

import flax.linen as nn

BATCH, LENGTH, EMBED = "act_batch", "act_len", "act_emb"
TOKENS = (BATCH, LENGTH, EMBED)  # (B, N, D) token sequences


def constrain(x, axes=TOKENS):
  """x under a sharding constraint by the logical `axes` (one name or None per dimension)."""
  return nn.with_logical_constraint(x, axes)
