"""Squeeze operators: golden outputs of the authors' code, properties, gradients, dtypes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized

import tps_jax
from conftest import golden, tokens


class GoldenTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_squeeze_eval_matches_authors(self):
    g = golden("squeeze_eval")
    out = self.variant(tps_jax.squeeze)(g["reserved"], g["pruned"])
    np.testing.assert_allclose(out, g["out"], rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_squeeze_train_matches_authors(self):
    g = golden("squeeze_train")
    out = self.variant(tps_jax.squeeze_masked)(g["x"], g["keep"], g["pruned"])
    np.testing.assert_allclose(out, g["out"], rtol=1e-5, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_train_form_on_gathered_sets_equals_eval_form(self):
    # The two forms agree when pruned tokens' hosts are the kept tokens.
    g = golden("squeeze_train")
    x, keep, pruned = g["x"], g["keep"][..., 0], g["pruned"][..., 0]
    out = self.variant(tps_jax.squeeze_masked)(x, keep, pruned)
    for b in range(x.shape[0]):
      kept = np.flatnonzero(keep[b])
      ev = tps_jax.squeeze(x[b:b + 1, kept], x[b:b + 1, np.flatnonzero(pruned[b])])
      np.testing.assert_allclose(out[b, kept], ev[0], rtol=1e-5, atol=1e-6)


class PropertyTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_shapes_and_dtype(self):
    r, p = tokens(0, 2, 7, 16), tokens(1, 2, 5, 16)
    out = self.variant(tps_jax.squeeze)(r, p)
    chex.assert_shape(out, (2, 7, 16))
    chex.assert_type(out, jnp.float32)
    out = self.variant(tps_jax.squeeze_masked)(tokens(2, 2, 9, 16), np.ones((2, 9)),
                                               np.zeros((2, 9, 1)))
    chex.assert_shape(out, (2, 9, 16))

  @chex.variants(with_jit=True, without_jit=True)
  def test_reserved_token_without_guests_is_unchanged(self):
    r, p = tokens(3, 4, 12, 8), tokens(4, 4, 3, 8)
    out, host = self.variant(tps_jax.squeeze_with_hosts)(r, p)
    host = np.asarray(host)
    untouched = 0
    for b in range(4):
      for j in range(12):
        if j not in host[b]:
          np.testing.assert_array_equal(out[b, j], r[b, j])
          untouched += 1
        else:
          assert not np.allclose(out[b, j], r[b, j])
    assert untouched >= 4 * (12 - 3)

  @chex.variants(with_jit=True, without_jit=True)
  def test_hosts_are_nearest_reserved_by_cosine(self):
    r, p = tokens(5, 2, 6, 4), tokens(6, 2, 9, 4)
    _, host = self.variant(tps_jax.squeeze_with_hosts)(r, p)
    rn = r / np.linalg.norm(r, axis=-1, keepdims=True)
    pn = p / np.linalg.norm(p, axis=-1, keepdims=True)
    np.testing.assert_array_equal(host, np.argmax(pn @ rn.transpose(0, 2, 1), -1))

  @chex.variants(with_jit=True, without_jit=True)
  def test_independent_of_pruned_order(self):
    r, p = tokens(7, 3, 10, 16), tokens(8, 3, 13, 16)
    perm = np.random.default_rng(0).permutation(13)
    fn = self.variant(tps_jax.squeeze)
    np.testing.assert_allclose(fn(r, p), fn(r, p[:, perm]), rtol=1e-6, atol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_masked_independent_of_token_order(self):
    x = tokens(9, 2, 20, 8)
    rng = np.random.default_rng(1)
    keep = (rng.random((2, 20)) < 0.5).astype(np.float32)
    pruned = (1 - keep) * (rng.random((2, 20)) < 0.7)
    perm = rng.permutation(20)
    fn = self.variant(tps_jax.squeeze_masked)
    np.testing.assert_allclose(fn(x, keep, pruned)[:, perm],
                               fn(x[:, perm], keep[:, perm], pruned[:, perm]),
                               rtol=1e-6, atol=1e-6)

  def test_host_weights_positive_and_sum_to_one(self):
    r, p = tokens(10, 2, 8, 16), tokens(11, 2, 12, 16)
    match = tps_jax.match_hosts(r, p)
    w = np.asarray(match.weight)  # (B, Np, Nr)
    # Exactly one host per pruned token, with a positive weight.
    np.testing.assert_array_equal((w > 0).sum(-1), 1)
    # Normalised fusion coefficients of each reserved token: (e, w_1j, ...) / (e + sum).
    den = np.e + w.sum(1)  # (B, Nr)
    coeffs = np.concatenate([np.full_like(den, np.e)[:, None], w], 1) / den[:, None]
    assert (coeffs[:, 0] > 0).all() and (coeffs >= 0).all()
    np.testing.assert_allclose(coeffs.sum(1), 1.0, rtol=1e-6)
    # So each output channel lies within the range of the host and its guests.
    out = np.asarray(tps_jax.squeeze(r, p))
    host = np.asarray(match.host)
    for b in range(2):
      for j in range(8):
        group = np.concatenate([r[b, j:j + 1], p[b, host[b] == j]], 0)
        assert (out[b, j] >= group.min(0) - 1e-6).all()
        assert (out[b, j] <= group.max(0) + 1e-6).all()

  def test_constant_tokens_stay_constant(self):
    v = tokens(12, 1, 1, 8)
    out = tps_jax.squeeze(np.repeat(v, 5, 1), np.repeat(v, 4, 1))
    np.testing.assert_allclose(out, np.repeat(v, 5, 1), rtol=1e-6)

  @parameterized.parameters(0.5, 1.0, 2.0)
  def test_temperature_scales_similarity(self, tau):
    r, p = tokens(13, 2, 5, 8), tokens(14, 2, 6, 8)
    match = tps_jax.match_hosts(r, p, temperature=tau)
    cos = np.asarray(tps_jax.cosine_similarity(p, r))
    expected = np.exp(np.take_along_axis(cos, np.asarray(match.host)[..., None], -1) / tau)
    np.testing.assert_allclose(np.asarray(match.weight).sum(-1, keepdims=True), expected,
                               rtol=1e-5)

  def test_masked_unpruned_and_unkept_tokens_unchanged(self):
    x = tokens(15, 2, 16, 8)
    keep = np.zeros((2, 16), np.float32); keep[:, :6] = 1
    pruned = np.zeros((2, 16), np.float32); pruned[:, 6:11] = 1  # 11: dropped earlier
    out, host = tps_jax.squeeze_masked_with_hosts(x, keep, pruned)
    np.testing.assert_array_equal(out[:, 6:], x[:, 6:])
    host = np.asarray(host)
    assert (host[:, 6:11] >= 0).all() and (host[:, 6:11] < 6).all()
    assert (host[:, :6] == -1).all() and (host[:, 11:] == -1).all()


class EdgeCaseTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_no_pruned_tokens(self):
    r = tokens(20, 2, 5, 8)
    out = self.variant(tps_jax.squeeze)(r, np.zeros((2, 0, 8), np.float32))
    np.testing.assert_array_equal(out, r)
    x = tokens(21, 2, 5, 8)
    out = self.variant(tps_jax.squeeze_masked)(x, np.ones((2, 5)), np.zeros((2, 5)))
    np.testing.assert_allclose(out, x, rtol=1e-6)

  @chex.variants(with_jit=True, without_jit=True)
  def test_every_token_pruned(self):
    p = tokens(22, 2, 5, 8)
    out, host = self.variant(tps_jax.squeeze_with_hosts)(np.zeros((2, 0, 8), np.float32), p)
    chex.assert_shape(out, (2, 0, 8))
    assert (np.asarray(host) == -1).all()
    x = tokens(23, 2, 5, 8)
    out, host = self.variant(tps_jax.squeeze_masked_with_hosts)(x, np.zeros((2, 5)),
                                                                np.ones((2, 5)))
    np.testing.assert_allclose(out, x, rtol=1e-6)
    assert (np.asarray(host) == -1).all()

  @parameterized.named_parameters(("none_pruned", 0), ("all_pruned", 5), ("some", 2))
  def test_gradients_finite_at_edges(self, n_pruned):
    x = tokens(24, 2, 5, 8)
    x[:, 0] = 0.0  # a zero token: the cosine's norm must not give NaN gradients
    keep = np.zeros((2, 5), np.float32); keep[:, n_pruned:] = 1
    g = jax.grad(lambda x, k: jnp.sum(tps_jax.squeeze_masked(x, k, 1 - k) ** 2),
                 argnums=(0, 1))(x, keep)
    chex.assert_tree_all_finite(g)
    r, p = x[:, n_pruned:], x[:, :n_pruned]
    g = jax.grad(lambda r, p: jnp.sum(tps_jax.squeeze(r, p) ** 2), argnums=(0, 1))(r, p)
    chex.assert_tree_all_finite(g)


class GradientTest(chex.TestCase):

  def test_check_grads_squeeze_masked(self):
    x = tokens(30, 2, 10, 6)
    keep = np.array([[1, 1, 1, 0, 0, 0, 1, 0, 0, 1]] * 2, np.float32)
    pruned = np.array([[0, 0, 0, 1, 1, 0, 0, 1, 1, 0]] * 2, np.float32)
    with jax.enable_x64():
      f = jax.jit(lambda x: tps_jax.squeeze_masked(x, keep, pruned))
      jax.test_util.check_grads(f, (x.astype(np.float64),), order=2, modes=["fwd", "rev"],
                                atol=1e-5, rtol=1e-5)

  def test_check_grads_squeeze(self):
    r, p = tokens(31, 2, 6, 5), tokens(32, 2, 4, 5)
    with jax.enable_x64():
      jax.test_util.check_grads(jax.jit(tps_jax.squeeze), (r.astype(np.float64), p.astype(np.float64)),
                                order=2, modes=["fwd", "rev"], atol=1e-5, rtol=1e-5)

  def test_gradient_reaches_pruned_mask(self):
    # The keep decision is straight-through in dTPS: d out / d pruned must be nonzero.
    x = tokens(33, 1, 6, 4)
    keep = np.array([[1, 1, 1, 0, 0, 0]], np.float32)
    g = jax.grad(lambda pr: jnp.sum(tps_jax.squeeze_masked(x, keep, pr)))(1 - keep)
    assert np.abs(np.asarray(g)[0, 3:]).sum() > 0


class DtypeTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_bfloat16_close_to_float32(self):
    r = jnp.asarray(tokens(40, 2, 30, 32), jnp.bfloat16)
    p = jnp.asarray(tokens(41, 2, 20, 32), jnp.bfloat16)
    out = self.variant(tps_jax.squeeze)(r, p)
    chex.assert_type(out, jnp.bfloat16)
    ref = tps_jax.squeeze(r.astype(jnp.float32), p.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)

    x = jnp.asarray(tokens(42, 2, 30, 32), jnp.bfloat16)
    keep = np.zeros((2, 30), np.float32); keep[:, ::2] = 1
    out = self.variant(tps_jax.squeeze_masked)(x, keep, 1 - keep)
    chex.assert_type(out, jnp.bfloat16)
    ref = tps_jax.squeeze_masked(x.astype(jnp.float32), keep, 1 - keep)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=2e-2, rtol=2e-2)

  def test_similarity_accumulates_in_float32(self):
    r = jnp.asarray(tokens(43, 1, 4, 8), jnp.bfloat16)
    chex.assert_type(tps_jax.cosine_similarity(r, r), jnp.float32)
    chex.assert_type(tps_jax.match_hosts(r, r).weight, jnp.float32)


class TransformTest(chex.TestCase):

  def test_vmap_over_a_leading_axis(self):
    r, p = tokens(50, 3, 2, 7, 8), tokens(51, 3, 2, 4, 8)
    out = jax.vmap(tps_jax.squeeze)(r, p)
    for i in range(3):
      np.testing.assert_allclose(out[i], tps_jax.squeeze(r[i], p[i]), rtol=1e-6)
    x = tokens(52, 3, 2, 9, 8)
    keep = np.tile(np.array([1, 0] * 4 + [1], np.float32), (3, 2, 1))
    out = jax.vmap(tps_jax.squeeze_masked)(x, keep, 1 - keep)
    for i in range(3):
      np.testing.assert_allclose(out[i], tps_jax.squeeze_masked(x[i], keep[i], 1 - keep[i]),
                                 rtol=1e-6)

  def test_jit_traces_once(self):
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(r, p):
      return tps_jax.squeeze(r, p)
    for seed in range(3):
      step(tokens(seed, 2, 5, 8), tokens(seed + 9, 2, 3, 8))
