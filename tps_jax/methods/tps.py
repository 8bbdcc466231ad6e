"""Token Pruning & Squeezing (Wei et al., CVPR 2023): each pruned token is squeezed into its
most similar kept token (its host) by a similarity-weighted average (docs/method.md, section 1).

- dTPS scores the tokens with a learned head between blocks (DynamicViT's);
- eTPS scores them with the stage block's attention (EViT's).
"""

from __future__ import annotations

from tps_jax.methods.registry import register
from tps_jax.methods.scored import AttentionStage, LearnedStage


@register("dtps")
class DTPS(LearnedStage):
  """Learned scores, pruned tokens squeezed (its pruning baseline: DynamicViT)."""
  prune = "squeeze"


@register("etps")
class ETPS(AttentionStage):
  """Attention scores, pruned tokens squeezed (its pruning baseline: EViT)."""
  prune = "squeeze"
