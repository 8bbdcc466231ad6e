"""EViT (Liang et al., ICLR 2022): the stage block's cls attention keeps the top tokens; the
pruned ones are fused into one extra token, weighted by their attention (docs/method.md,
section 3)."""

from __future__ import annotations

from tps_jax.methods.registry import register
from tps_jax.methods.scored import AttentionStage


@register("evit")
class EViT(AttentionStage):
  prune = "fuse"
  extra_tokens = 1  # the fused token
