"""tps_jax: Token Pruning & Squeezing (TPS, CVPR 2023) for vision transformers in JAX/Flax.

The operators of `tps_jax.ops` are re-exported here, loaded on first use, so that importing a
light module (`tps_jax.host`, which must run before JAX starts) does not import JAX.
"""

__version__ = "0.1.0"

__all__ = ("HostMatch", "MergePlan", "POLICY_FORMS", "ToMeMatch", "attention_row",
           "bipartite_soft_matching",
           "class_attention_scores", "cosine_similarity", "diffrate_merge",
           "dot_product_attention", "energy_scores", "evit_fuse", "fuse", "gather_tokens",
           "gumbel_softmax_hard", "indices_to_mask", "keep_counts", "match_hosts",
           "match_hosts_masked", "max_merge", "mctf_match", "mctf_merge", "mctf_scores",
           "merge_by_index", "merge_plan", "merge_rows", "merge_sum", "merge_wavg",
           "normalize", "pitome_match", "planned_merge", "policy_attention", "policy_softmax",
           "pooling_weights", "proportional_attention_bias", "protected_first", "squeeze", "squeeze_masked",
           "squeeze_masked_with_hosts", "squeeze_with_hosts", "topk_split")


def __getattr__(name):
  if name in __all__:
    from tps_jax import ops  # pylint: disable=g-import-not-at-top
    return getattr(ops, name)
  raise AttributeError(f"module 'tps_jax' has no attribute {name!r}")


def __dir__():
  return sorted((*globals(), *__all__))
