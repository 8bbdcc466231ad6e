"""Analytic MACs: the papers' figures for dense DeiT, and XLA's count for every method."""

import jax
import jax.numpy as jnp
import pytest

from tps_jax import flops, methods
from tps_jax.models.vit import Model


@pytest.mark.parametrize("variant,gmacs", [("Ti/16", 1.26), ("S/16", 4.6), ("B/16", 17.6)])
def test_dense_deit_matches_papers(variant, gmacs):
  # DeiT's table rounds Ti to 1.3 G; unrounded (as fvcore counts it) it is 1.26 G.
  assert flops.macs(Model(1000, variant=variant)) / 1e9 == pytest.approx(gmacs, rel=0.02)


def test_keep_ratio_07_is_about_3_gmacs():
  # The paper's dTPS / DynamicViT DeiT-S at keep 0.7: about 3.0 G.
  m = Model(1000, variant="S/16", reduction=dict(method="dtps", keep_ratio=0.7))
  assert flops.macs(m) / 1e9 == pytest.approx(3.0, rel=0.03)


def test_embedding_counts_the_input_channels():
  # One patch of P*P*C values projected to D: N0 * P^2 * C * D.
  for channels in (1, 3):
    m = Model(10, variant="Ti/16", image_size=32, patch_size=8, channels=channels)
    assert flops.breakdown(m)["embedding"] == 16 * 64 * channels * 192


# Settings beyond each method's example (which tests/test_methods.py counts): MCTF's other
# one-step-ahead forms, and methods on DeiT-Ti's 3-channel geometry.
SETTINGS = [("Ti", "dtps", {"keep_ratio": 0.7}), ("Ti", "tome", {"r": 8}),
            ("Ti", "mctf", {"r": 8}),
            ("small", "mctf", {"r": 4, "one_step_ahead": 0, "bidirection": False}),
            ("small", "mctf", {"r": 0.3, "locations": (3, 6), "one_step_ahead": 2,
                               "pooling": "mean"}),
            ("swiglu", "dtps", {"keep_ratio": 0.7})]  # DINOv2 giant's MLP: D x M, then M / 2 x D
SMALL = dict(width=96, depth=8, num_heads=3, mlp_dim=384, patch_size=4, image_size=28,
             channels=1)


@pytest.mark.parametrize("geometry,method,kw", SETTINGS)
def test_matches_the_traced_matmuls(geometry, method, kw):
  more = dict(mlp="swiglu") if geometry == "swiglu" else {}
  m = (Model(1000, variant="Ti/16", reduction=dict(method=method, **kw)) if geometry == "Ti"
       else Model(10, reduction=dict(method=method, **kw), **SMALL, **more))
  assert flops.macs(m) == pytest.approx(flops.matmul_macs(m), rel=0.001)


def test_xla_counts_the_dense_model_compiled_and_lowered_alike():
  m = Model(10, **SMALL)
  image = jnp.zeros((1, 28, 28, 1))
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), image))
  ours, xla = flops.macs(m), flops.xla_macs(m, params)
  assert 1.03 < xla / ours < 1.2  # the elementwise work (softmax, GELU, LayerNorm)
  assert flops.xla_macs(m, params, optimized=False) == pytest.approx(xla, rel=0.02)


# Every method that runs without a cls token (DiffRate's search forward needs one).
CLS_FREE = ([("gap", {}, m) for m in methods.names() if m == "none" or methods.get(m).reduces]
            + [("map", {"rep_size": 48}, m) for m in ("none", "etps", "tome", "pitome")]
            + [("0", {"posemb": "sincos2d"}, m) for m in ("dtps", "evit")])


@pytest.mark.parametrize("pool,extra,method", CLS_FREE)
def test_cls_free_models_match_the_traced_matmuls(pool, extra, method):
  """Without a cls token (and with a MAP head, pre-logits, a protected token 0) the count
  still equals the traced program's matrix products (one score row per attention stage, as
  for cls)."""
  probe = Model(10, pool_type=pool, **extra, **SMALL)
  spec = methods.get(method).example(probe.plan().geometry)
  m = Model(10, pool_type=pool, reduction=spec, **extra, **SMALL)
  assert flops.macs(m) == pytest.approx(flops.matmul_macs(m), rel=0.002)
