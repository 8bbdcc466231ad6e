"""ToMe bipartite soft matching: a direct reference, size tracking, proportional attention."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import tps_jax
from conftest import tokens


def _tome_reference(x, size, metric, r):
  """ToMe's algorithm written out with loops over one example (cls at 0)."""
  m = metric / np.linalg.norm(metric, axis=-1, keepdims=True)
  a_idx, b_idx = np.arange(0, len(x), 2), np.arange(1, len(x), 2)
  scores = m[a_idx] @ m[b_idx].T
  scores[0] = -np.inf
  best, dst = scores.max(-1), scores.argmax(-1)
  order = sorted(range(len(a_idx)), key=lambda i: (-best[i], i))
  src = set(order[:r])
  xs, ss = x * size[:, None], size.copy()
  bx, bs = xs[b_idx].copy(), ss[b_idx].copy()
  for i in src:
    bx[dst[i]] += xs[a_idx[i]]
    bs[dst[i]] += ss[a_idx[i]]
  keep = [a_idx[i] for i in range(len(a_idx)) if i not in src]
  out_x = np.concatenate([xs[keep], bx]) / np.concatenate([ss[keep], bs])[:, None]
  return out_x, np.concatenate([ss[keep], bs])


class ToMeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 4, 8)
  def test_matches_reference(self, r):
    x, metric = tokens(0, 2, 17, 6), tokens(1, 2, 17, 4)
    size = 1.0 + np.abs(tokens(2, 2, 17))

    def f(x, size, metric):
      return tps_jax.merge_wavg(x, size, tps_jax.bipartite_soft_matching(metric, r))

    out, new_size = self.variant(f)(x, size, metric)
    chex.assert_shape([out, new_size], [(2, 17 - r, 6), (2, 17 - r)])
    for b in range(2):
      ref_x, ref_s = _tome_reference(x[b], size[b], metric[b], r)
      np.testing.assert_allclose(out[b], ref_x, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(new_size[b], ref_s, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_total_size_preserved_and_cls_untouched(self):
    x = tokens(3, 3, 65, 8)
    merge = self.variant(
        lambda x, s: tps_jax.merge_wavg(x, s, tps_jax.bipartite_soft_matching(x, 8)))
    y, size = merge(x, jnp.ones((3, 65)))
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    # A second merge keeps the total too (op by op, each new shape compiles every op anew).
    y, size = merge(y, size)
    chex.assert_shape(y, (3, 65 - 2 * 8, 8))
    np.testing.assert_allclose(np.sum(size, -1), 65.0, rtol=1e-6)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(2, 5)
  def test_protected_tokens_lead_untouched_and_the_rest_is_the_one_token_merge(self, p):
    """cls and registers (p leading tokens) neither merge nor take a merge, and lead the
    output in their order; every output is the mean of the tokens the index sends to it."""
    from tps_jax.methods import stages  # pylint: disable=g-import-not-at-top
    x = tokens(6, 2, 25, 8)
    r = tps_jax.max_merge(25, p)

    def f(x):
      match = tps_jax.bipartite_soft_matching(x, r, protected=p)
      return (*tps_jax.merge_wavg(x, None, match), stages.tome_new_index(match, 25))

    y, size, new_index = self.variant(f)(x)
    chex.assert_shape(y, (2, 25 - r, 8))
    np.testing.assert_array_equal(y[:, :p], x[:, :p])
    np.testing.assert_array_equal(size[:, :p], 1.0)
    np.testing.assert_array_equal(new_index[:, :p], np.broadcast_to(np.arange(p), (2, p)))
    assert all((np.bincount(row)[:p] == 1).all() for row in np.asarray(new_index))
    np.testing.assert_allclose(np.sum(size, -1), 25.0, rtol=1e-6)
    for b in range(2):  # every output is the size-weighted mean of the tokens sent to it
      for o in range(25 - r):
        sent = np.asarray(new_index[b]) == o
        np.testing.assert_allclose(y[b, o], np.mean(np.asarray(x[b])[sent], 0), rtol=1e-5,
                                   atol=1e-6)

  def test_max_merge_and_limits(self):
    assert tps_jax.max_merge(197) == 98
    x = tokens(4, 1, 197, 4)
    y, s = tps_jax.merge_wavg(x, None, tps_jax.bipartite_soft_matching(x, 98))
    chex.assert_shape(y, (1, 99, 4))
    with pytest.raises(ValueError, match=r"r=99 is out of range \[0, 98\]"):
      tps_jax.bipartite_soft_matching(x, 99)

  def test_proportional_attention_bias(self):
    size = np.array([[1.0, 2.0, 4.0]], np.float32)
    bias = tps_jax.proportional_attention_bias(size)
    chex.assert_shape(bias, (1, 1, 1, 3))
    np.testing.assert_allclose(bias[0, 0, 0], np.log(size[0]), rtol=1e-6)

  def test_gradient_flows_to_tokens_not_metric(self):
    x = tokens(5, 1, 9, 4)
    f = lambda x: jnp.sum(tps_jax.merge_wavg(x, None, tps_jax.bipartite_soft_matching(x, 3))[0]
                          ** 2)
    g = jax.grad(f)(x)
    chex.assert_tree_all_finite(g)
    assert np.abs(np.asarray(g)).sum() > 0

  def test_bfloat16(self):
    x = jnp.asarray(tokens(6, 2, 11, 8), jnp.bfloat16)
    y, size = tps_jax.merge_wavg(x, None, tps_jax.bipartite_soft_matching(x, 3))
    chex.assert_type([y, size], [jnp.bfloat16, jnp.float32])
