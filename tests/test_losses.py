"""docs/method.md, section 9 losses: values against direct formulas, and the token-distillation targets."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tps_jax.models.vit import Model
from tps_jax.trainer import losses
from conftest import jit_apply, jit_init


def test_terms_against_direct_formulas():
  rng = np.random.default_rng(0)
  logits, t_logits = rng.normal(size=(2, 4, 5))
  targets = np.full((4, 5), 0.02) + 0.9 * np.eye(5)[[1, 3, 0, 4]]  # smoothing 0.1
  p, q = jax.nn.softmax(t_logits), jax.nn.softmax(logits)
  np.testing.assert_allclose(losses.soft_cross_entropy(logits, targets),
                             np.mean(-np.sum(targets * np.log(q), -1)), rtol=1e-5)
  np.testing.assert_allclose(losses.distill_kl(logits, t_logits),
                             np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)), rtol=1e-5)
  d = [jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]]), jnp.array([[1, 0, 0, 0], [0, 0, 0, 0]])]
  expect = (((0.5 - 0.5) ** 2 + (0.25 - 0.5) ** 2) / 2 + ((0.25 - 0.25) ** 2 + 0.25 ** 2) / 2) / 2
  np.testing.assert_allclose(losses.keep_ratio_loss(d, (0.5, 0.25)), expect, rtol=1e-6)


def test_token_distillation_never_gathers_a_token_without_position():
  b, n, d = 2, 6, 3
  teacher = jnp.arange(b * (1 + n) * d, dtype=jnp.float32).reshape(b, 1 + n, d)
  # Student kept patches 4 and 1 and, in the middle, EViT's fused token (-1).
  positions = jnp.array([[4, -1, 1], [0, 5, -1]])
  encoded = jnp.zeros((b, 1 + 3, d))
  student, target, live = losses.final_patch_tokens(
      {"encoded": encoded, "keep_indices": [positions]}, teacher)
  np.testing.assert_array_equal(live, [[1, 0, 1], [1, 1, 0]])
  np.testing.assert_array_equal(target[0, 0], teacher[0, 1 + 4])
  np.testing.assert_array_equal(target[1, 1], teacher[1, 1 + 5])
  # The loss is the mean over the four real tokens only.
  want = np.mean([np.sum(np.asarray(teacher[i, 1 + p]) ** 2) / d
                  for i, row in enumerate(positions.tolist()) for p in row if p >= 0])
  np.testing.assert_allclose(losses.token_mse(student, target, live), want, rtol=1e-6)


def test_evit_model_distills_only_real_patches():
  model = Model(10, variant="Ti/16", image_size=32, patch_size=8, depth=4,
                reduction={"method": "evit", "keep_ratio": 0.5, "locations": (1, 2)})
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  params = jit_init(model, jax.random.key(1), x)["params"]
  _, out = jit_apply(model, {"params": params}, x, train=False)
  positions = out["keep_indices"][-1]
  # Each stage appends a fused token; an earlier one may be kept by the next stage.
  assert (positions[:, -1] == -1).all() and (positions == -1).sum() >= 2
  teacher = jax.random.normal(jax.random.key(2), (2, 17, model.width))
  _, _, live = losses.final_patch_tokens(out, teacher)
  np.testing.assert_array_equal(live, positions >= 0)


def test_schedule_is_linear_warmup_then_cosine():
  from tps_jax.trainer import optim  # pylint: disable=g-import-not-at-top
  sched = optim.schedule(lr=1e-3, total_steps=100, warmup_steps=10, warmup_init_lr=1e-6,
                         min_lr=1e-5)
  for step in (0, 5, 10, 40, 100):
    if step <= 10:
      want = 1e-6 + (1e-3 - 1e-6) * step / 10
    else:
      want = 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + np.cos(np.pi * (step - 10) / 90))
    np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5)


def test_optimizer_skips_a_step_with_nonfinite_gradients():
  from tps_jax.trainer import optim  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.ones((3, 2)), "score_head_0": {"b": jnp.zeros(2)}}
  tx, _ = optim.make_optimizer(params, total_steps=10, lr=1e-2, clip_norm=1.0)
  state = tx.init(params)
  good = jax.tree.map(jnp.ones_like, params)
  updates, state = tx.update(good, state, params)
  params = optax.apply_updates(params, updates)
  bad = {"w": jnp.full((3, 2), jnp.nan), "score_head_0": {"b": jnp.ones(2)}}
  updates, skipped = tx.update(bad, state, params)
  # Parameters and the inner (AdamW) state are exactly as before; one skip is counted.
  chex.assert_trees_all_equal(optax.apply_updates(params, updates), params)
  chex.assert_trees_all_equal(skipped.inner_state, state.inner_state)
  assert int(skipped.notfinite_count) == 1 and int(state.notfinite_count) == 0
