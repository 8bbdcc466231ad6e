"""Top-k: the stage block's attention keeps the top tokens and the rest are dropped (the
attention-scored pruning baseline; docs/method.md, section 3)."""

from __future__ import annotations

from tps_jax.methods.registry import register
from tps_jax.methods.scored import AttentionStage


@register("topk")
class TopK(AttentionStage):
  prune = "drop"
