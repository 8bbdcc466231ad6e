"""DynamicViT (Rao et al., NeurIPS 2021): a learned score head between blocks; the pruned
tokens are dropped (docs/method.md, section 2)."""

from __future__ import annotations

from tps_jax.methods.registry import register
from tps_jax.methods.scored import LearnedStage


@register("dynamicvit")
class DynamicViT(LearnedStage):
  prune = "drop"
