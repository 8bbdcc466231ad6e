"""Pure-array operators of token reduction: no Flax state, static shapes."""

from tps_jax.ops.attention import (POLICY_FORMS, attention_row, class_attention_scores,
                                   dot_product_attention, policy_attention, policy_softmax)
from tps_jax.ops.evit import evit_fuse
from tps_jax.ops.gumbel import gumbel_softmax_hard
from tps_jax.ops.select import gather_tokens, indices_to_mask, keep_counts, topk_split
from tps_jax.ops.squeezing import (HostMatch, cosine_similarity, fuse, match_hosts,
                                 match_hosts_masked, squeeze, squeeze_masked,
                                 squeeze_masked_with_hosts, squeeze_with_hosts)
from tps_jax.ops.merge import (MergePlan, max_merge, merge_by_index, merge_plan, normalize,
                               planned_merge, protected_first)
from tps_jax.ops.tome import (ToMeMatch, bipartite_soft_matching, merge_sum, merge_wavg,
                              proportional_attention_bias)
from tps_jax.ops.pitome import energy_scores, pitome_match
from tps_jax.ops.mctf import (mctf_match, mctf_merge, mctf_scores, merge_rows,
                              pooling_weights)
from tps_jax.ops.diffrate import diffrate_merge
