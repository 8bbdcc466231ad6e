"""Selection, policy softmax, class-attention scores, Gumbel decisions, EViT fusion."""

from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import tps_jax
from conftest import tokens


class KeepCountsTest(parameterized.TestCase):

  def test_cumulative_scalar_ratio(self):
    self.assertEqual(tps_jax.keep_counts(196, 0.7, 3), (137, 96, 67))
    self.assertEqual(tps_jax.keep_counts(64, 0.6, 3), (38, 23, 13))
    self.assertEqual(tps_jax.keep_counts(196, 1.0, 3), (196, 196, 196))

  def test_ratio_per_stage(self):
    self.assertEqual(tps_jax.keep_counts(196, [0.7, 0.49, 0.343]), (137, 96, 67))

  @parameterized.parameters(0.0, -0.5, 1.5)
  def test_bad_scalar_ratio(self, rho):
    with pytest.raises(ValueError, match="keep_ratio"):
      tps_jax.keep_counts(196, rho, 3)

  def test_bad_lists(self):
    with pytest.raises(ValueError, match="needs num_stages"):
      tps_jax.keep_counts(196, 0.7)
    with pytest.raises(ValueError, match="increase"):
      tps_jax.keep_counts(196, [0.5, 0.7])
    with pytest.raises(ValueError, match="num_stages=2"):
      tps_jax.keep_counts(196, [0.5, 0.4, 0.3], num_stages=2)


class TopkSplitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(0, 1, 7, 12)
  def test_partition_by_score(self, k):
    s = tokens(0, 3, 12)
    keep, prune = self.variant(lambda s: tps_jax.topk_split(s, k))(s)
    chex.assert_shape([keep, prune], [(3, k), (3, 12 - k)])
    for b in range(3):
      np.testing.assert_array_equal(np.sort(np.concatenate([keep[b], prune[b]])), np.arange(12))
      np.testing.assert_array_equal(keep[b], np.argsort(-s[b])[:k])

  def test_ties_never_select_a_token_twice(self):
    keep, prune = tps_jax.topk_split(np.zeros((2, 9), np.float32), 4)
    for b in range(2):
      assert len(set(np.concatenate([keep[b], prune[b]]).tolist())) == 9

  @chex.variants(with_jit=True, without_jit=True)
  def test_gather_and_mask(self):
    x = tokens(1, 2, 10, 4)
    idx = np.array([[3, 0, 9], [1, 1, 2]], np.int32)
    out = self.variant(tps_jax.gather_tokens)(x, idx)
    np.testing.assert_array_equal(out, np.stack([x[0, idx[0]], x[1, idx[1]]]))
    mask = self.variant(lambda i: tps_jax.indices_to_mask(i, 10))(idx[:1])
    np.testing.assert_array_equal(mask[0], np.isin(np.arange(10), idx[0]).astype(np.float32))


def _policy_softmax_reference(a, pi, eps=1e-6):
  n = a.shape[-1]
  p = pi[:, None, None, :] + (1 - pi[:, None, None, :]) * np.eye(n)
  e = np.exp(a - a.max(-1, keepdims=True)) * p
  return (e + eps / n) / (e.sum(-1, keepdims=True) + eps)


class PolicySoftmaxTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_matches_formula(self):
    a = tokens(2, 2, 3, 6, 6)
    pi = np.array([[1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]], np.float32)
    out = self.variant(tps_jax.policy_softmax)(a, pi)
    np.testing.assert_allclose(out, _policy_softmax_reference(a, pi), rtol=1e-5, atol=1e-7)

  @chex.variants(with_jit=True, without_jit=True)
  def test_full_policy_is_softmax_and_rows_sum_to_one(self):
    a = tokens(3, 2, 2, 5, 5)
    out = self.variant(tps_jax.policy_softmax)(a, np.ones((2, 5, 1), np.float32))
    np.testing.assert_allclose(out, jax.nn.softmax(a, -1), atol=1e-5)
    np.testing.assert_allclose(np.sum(out, -1), 1.0, atol=1e-5)

  def test_dropped_keys_get_no_attention_and_empty_policy_attends_self(self):
    a = tokens(4, 1, 1, 4, 4)
    out = np.asarray(tps_jax.policy_softmax(a, np.array([[1, 0, 1, 1]], np.float32)))
    assert (out[0, 0, [0, 2, 3], 1] < 1e-5).all()  # nobody else attends to token 1
    # Token 1 itself still attends to the live tokens and to itself.
    np.testing.assert_allclose(out[0, 0, 1], jax.nn.softmax(a[0, 0, 1]), atol=1e-5)
    out = np.asarray(tps_jax.policy_softmax(a, np.zeros((1, 4), np.float32)))
    np.testing.assert_allclose(np.diagonal(out[0, 0]), 1.0, atol=1e-5)

  def test_bfloat16_output_dtype_and_gradient_through_policy(self):
    a = jnp.asarray(tokens(5, 1, 2, 4, 4), jnp.bfloat16)
    chex.assert_type(tps_jax.policy_softmax(a, np.ones((1, 4))), jnp.bfloat16)
    g = jax.grad(lambda pi: jnp.sum(tps_jax.policy_softmax(a.astype(jnp.float32), pi)[..., 0]))(
        np.ones((1, 4), np.float32))
    chex.assert_tree_all_finite(g)
    assert np.abs(np.asarray(g)).sum() > 0


class PolicyAttentionTest(chex.TestCase):
  """The forms of ops.policy_attention: exact, deferred (and fused, to its 1e-6 smoothing) are
  docs/method.md; log_bias is close but cuts a gradient."""

  @staticmethod
  def _inputs(seed=7, b=2, n=9, h=3, d=4):
    q, k, v = (tokens(seed + i, b, n, h, d) for i in range(3))
    pi = (np.random.default_rng(seed).random((b, n)) > 0.4).astype(np.float32)
    pi[:, 0] = 1.0  # cls is always live
    return q, k, v, pi

  def _reference(self, q, k, v, pi):
    a = np.einsum("bqhd,bkhd->bhqk", q, k)
    return np.einsum("bhqk,bkhd->bqhd", _policy_softmax_reference(a, pi), v)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters("exact", "deferred")
  def test_exact_forms_match_the_spec(self, form):
    q, k, v, pi = self._inputs()
    out = self.variant(lambda *a: tps_jax.policy_attention(*a, form=form))(q, k, v, pi)
    np.testing.assert_allclose(out, self._reference(q, k, v, pi), rtol=1e-5, atol=1e-6)

  def test_deferred_has_the_exact_gradients(self):
    q, k, v, pi = self._inputs(seed=11)
    w = tokens(3, *v.shape)
    grads = {form: jax.grad(lambda *a: jnp.sum(w * tps_jax.policy_attention(*a, form=form)),
                            argnums=(0, 1, 2, 3))(q, k, v, pi)
             for form in ("exact", "deferred")}
    chex.assert_trees_all_close(grads["deferred"], grads["exact"], rtol=1e-4, atol=1e-5)
    assert np.abs(np.asarray(grads["exact"][3])).sum() > 0  # the policy gets a gradient

  def test_log_bias_is_close_but_cuts_the_dropped_tokens_policy_gradient(self):
    q, k, v, pi = self._inputs(seed=13)
    exact = tps_jax.policy_attention(q, k, v, pi, form="exact")
    fused = tps_jax.policy_attention(q, k, v, pi, form="log_bias")
    # Only the 1e-6 smoothing differs; it weighs more where a dropped key holds a row's max.
    np.testing.assert_allclose(fused, exact, atol=2e-4)
    w = tokens(4, *v.shape)
    grad = lambda form: np.asarray(jax.grad(
        lambda p: jnp.sum(w * tps_jax.policy_attention(q, k, v, p, form=form)))(pi))
    exact_g, fused_g = grad("exact"), grad("log_bias")
    np.testing.assert_allclose(fused_g[pi == 1], exact_g[pi == 1], rtol=1e-4, atol=1e-5)
    assert (fused_g[pi == 0] == 0).all() and np.abs(exact_g[pi == 0]).min() > 0

  def test_fused_has_the_exact_gradients_including_dropped_tokens_policy(self):
    q, k, v, pi = self._inputs(seed=17)
    soft = np.random.default_rng(5).random(pi.shape).astype(np.float32)
    w = tokens(6, *v.shape)

    def grads(form):  # through a straight-through policy, as dTPS trains
      def loss(q, k, v, s):
        p = pi - jax.lax.stop_gradient(s) + s
        return jnp.sum(w * tps_jax.policy_attention(q, k, v, p, form=form))
      return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, soft)

    exact, fused = grads("exact"), grads("fused")
    np.testing.assert_allclose(tps_jax.policy_attention(q, k, v, pi, form="fused"),
                               self._reference(q, k, v, pi), atol=2e-4)
    chex.assert_trees_all_close(fused, exact, rtol=1e-3, atol=1e-4)
    assert np.abs(np.asarray(exact[3])[pi == 0]).min() > 0  # dropped tokens get a gradient

  @parameterized.parameters((15.0, jnp.float32), (60.0, jnp.float32), (60.0, jnp.bfloat16))
  def test_fused_policy_gradient_stays_exact_when_a_dropped_key_dominates(self, gap, dtype):
    # trained ViTs have high-norm tokens whose logits exceed every kept key's.
    # Dividing by the kept keys' log-sum-exp multiplies the policy gradient by exp(gap) there
    # (2.5e4x the exact form's at a gap of 15, NaN at 60); docs/method.md's eps bounds it.
    q, k, v, pi = self._inputs(seed=23)
    pi[:, 1:] = 1.0
    pi[:, 3] = 0.0  # key 3 is dropped in both images
    q, k = np.abs(q) + 0.5, 0.2 * k  # kept logits within about +-1
    u = np.full(q.shape[-1], q.shape[-1] ** -0.5, np.float32)
    k[:, 3] = u * gap / (q @ u).min(axis=1)[..., None]  # every query's logit at key 3 >= gap
    w = tokens(8, *v.shape)

    def grads(form):
      def loss(pi):
        y = tps_jax.policy_attention(*(jnp.asarray(t, dtype) for t in (q, k, v)), pi, form=form)
        return jnp.sum(w * y.astype(jnp.float32))
      return np.asarray(jax.jit(jax.grad(loss))(pi))

    exact, fused = grads("exact"), grads("fused")
    assert np.isfinite(fused).all(), fused
    scale = np.abs(exact).max()
    tol = 1e-3 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(fused, exact, atol=tol * scale, rtol=tol)
    assert np.abs(exact[:, 3]).min() > 0

  def test_cudnn_padding_of_odd_token_counts(self):
    # cuDNN trains only over an even N: an odd N gets a zero token no query sees. Run the
    # padded call through XLA here (no GPU) to check the padding, the mask and the slicing.
    q, k, v, pi = self._inputs(seed=19)  # N = 9
    real = jax.nn.dot_product_attention

    def on_xla(*a, implementation=None, **kw):
      del implementation
      return real(*a, implementation="xla", **kw)

    with pytest.raises(ValueError, match="cudnn attention needs a CUDA GPU"):
      tps_jax.ops.dot_product_attention(q, k, v, implementation="cudnn")
    with mock.patch.object(jax.nn, "dot_product_attention", on_xla), \
         mock.patch("tps_jax.ops.attention._check_cudnn"):
      for form in ("fused", "log_bias"):
        np.testing.assert_allclose(
            tps_jax.policy_attention(q, k, v, pi, form=form, implementation="cudnn"),
            tps_jax.policy_attention(q, k, v, pi, form=form), atol=1e-6)
      bias = tokens(8, 2, 1, 1, 9)  # (B, 1, 1, N), as ToMe's size bias
      for b in (None, bias):
        got = tps_jax.ops.dot_product_attention(q, k, v, bias=b, implementation="cudnn",
                                                return_lse=True)
        want = tps_jax.ops.dot_product_attention(q, k, v, bias=b, return_lse=True)
        chex.assert_trees_all_close(got, want, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
      tps_jax.ops.dot_product_attention(q, k, v, implementation="flash")

  def test_bfloat16_and_errors(self):
    q, k, v, pi = (jnp.asarray(t, jnp.bfloat16) for t in self._inputs())
    for form in tps_jax.ops.POLICY_FORMS:
      out = tps_jax.policy_attention(q, k, v, pi, form=form)
      chex.assert_type(out, jnp.bfloat16)
      np.testing.assert_allclose(np.asarray(out, np.float32), self._reference(
          *(np.asarray(t, np.float32) for t in (q, k, v, pi))), atol=0.05)
    with pytest.raises(ValueError, match="unknown policy attention form 'flash'"):
      tps_jax.policy_attention(q, k, v, pi, form="flash")
    with pytest.raises(ValueError, match="unknown attention implementation 'tpu'"):
      tps_jax.policy_attention(q, k, v, pi, form="fused", implementation="tpu")
    with pytest.raises(ValueError, match="policy must have shape"):
      tps_jax.policy_attention(q, k, v, pi[:, :4])


class ClassAttentionTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_mean_over_heads_of_cls_row(self):
    attn = jax.nn.softmax(tokens(6, 2, 3, 5, 5), -1)
    out = self.variant(tps_jax.class_attention_scores)(attn)
    np.testing.assert_allclose(out, np.asarray(attn)[:, :, 0, 1:].mean(1), rtol=1e-6)
    chex.assert_shape(out, (2, 4))


class GumbelTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_forward_is_one_hot_and_noise_off_is_argmax(self):
    logits = tokens(7, 4, 6, 2)
    hard = self.variant(tps_jax.gumbel_softmax_hard)(logits)
    np.testing.assert_array_equal(hard, jax.nn.one_hot(np.argmax(logits, -1), 2))
    hard = self.variant(tps_jax.gumbel_softmax_hard)(logits, jax.random.key(0))
    np.testing.assert_array_equal(np.sum(hard, -1), 1.0)
    assert set(np.unique(hard).tolist()) <= {0.0, 1.0}

  def test_gradient_is_the_soft_sample_gradient(self):
    logits = tokens(8, 3, 2)
    f_hard = lambda l: jnp.sum(tps_jax.gumbel_softmax_hard(l)[:, 0] * jnp.arange(3.0))
    f_soft = lambda l: jnp.sum(jax.nn.softmax(l)[:, 0] * jnp.arange(3.0))
    np.testing.assert_allclose(jax.grad(f_hard)(logits), jax.grad(f_soft)(logits), rtol=1e-6)

  def test_sample_frequencies_follow_softmax(self):
    logits = np.log(np.array([[0.2, 0.8]], np.float32))
    keys = jax.random.split(jax.random.key(1), 20000)
    samples = jax.vmap(lambda k: tps_jax.gumbel_softmax_hard(logits, k))(keys)
    np.testing.assert_allclose(np.asarray(samples).mean(0)[0], [0.2, 0.8], atol=0.015)


class EvitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_weighted_sum_without_renormalising(self):
    y, a = tokens(9, 2, 5, 3), np.abs(tokens(10, 2, 5)) * 0.1
    out = self.variant(tps_jax.evit_fuse)(y, a)
    np.testing.assert_allclose(out[:, 0], np.einsum("bn,bnc->bc", a, y), rtol=1e-5)
    chex.assert_shape(out, (2, 1, 3))

  @chex.variants(with_jit=True, without_jit=True)
  def test_nothing_pruned_gives_zero_token(self):
    out = self.variant(tps_jax.evit_fuse)(np.zeros((2, 0, 3), np.float32), np.zeros((2, 0)))
    np.testing.assert_array_equal(out, np.zeros((2, 1, 3)))

  def test_bfloat16(self):
    y = jnp.asarray(tokens(11, 2, 5, 3), jnp.bfloat16)
    out = tps_jax.evit_fuse(y, jnp.full((2, 5), 0.1, jnp.bfloat16))
    chex.assert_type(out, jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(out, np.float32),
                               tps_jax.evit_fuse(y.astype(jnp.float32), np.full((2, 5), 0.1)),
                               atol=2e-2)


def test_the_package_exports_every_operator():
  from tps_jax import ops  # pylint: disable=g-import-not-at-top
  public = {n for n in vars(ops) if not n.startswith("_") and not isinstance(
      getattr(ops, n), type(ops))}
  public -= {"annotations"}
  assert set(tps_jax.__all__) == public, set(tps_jax.__all__) ^ public
  assert all(getattr(tps_jax, n) is getattr(ops, n) for n in tps_jax.__all__)
