"""tps_jax: Token Pruning & Squeezing (TPS, CVPR 2023) for vision transformers in JAX/Flax."""

from tps_jax.ops import (HostMatch, ToMeMatch, bipartite_soft_matching, class_attention_scores,
                         cosine_similarity, evit_fuse, fuse, gather_tokens,
                         gumbel_softmax_hard, indices_to_mask, keep_counts, match_hosts,
                         match_hosts_masked, max_merge, merge_sum, merge_wavg,
                         policy_attention, policy_softmax, proportional_attention_bias, squeeze,
                         squeeze_masked, squeeze_masked_with_hosts, squeeze_with_hosts,
                         topk_split)

__version__ = "0.1.0"
