"""Analytic MACs: the papers' figures for dense DeiT, and XLA's count for every method."""

import jax
import jax.numpy as jnp
import pytest

from tps_jax import flops
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


METHODS = [("none", {}), ("dtps", {"keep_ratio": 0.7}), ("dynamicvit", {"keep_ratio": 0.5}),
           ("etps", {"keep_ratio": 0.7}), ("evit", {"keep_ratio": 0.5}),
           ("topk", {"keep_ratio": 0.7}), ("tome", {"r": 8}), ("pitome", {"keep_ratio": 0.9}),
           ("mctf", {"r": 8}), ("mctf", {"r": 8, "one_step_ahead": 0, "bidirection": False}),
           ("mctf", {"r": 0.3, "locations": (3, 6), "one_step_ahead": 2, "pooling": "mean"}),
           ("diffrate", {"prune_kept": (49, 44, 40, 40, 30, 30, 30, 20),
                         "merge_kept": (49, 40, 40, 35, 25, 25, 20, 15)})]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("method,kw", METHODS)
def test_matches_the_traced_matmuls_and_xla(method, kw, channels):
  if (method == "mctf" and kw != {"r": 8} or method == "diffrate") and channels == 3:
    pytest.skip("counted on the small geometry only (suite time; diffrate's schedule is "
                "for its 49 patches)")
  # The Fashion-MNIST geometry (1 channel, patch 4) is where the embedding matters most.
  if channels == 1:
    m = Model(10, width=96, depth=8, num_heads=3, mlp_dim=384, patch_size=4, image_size=28,
              channels=1, reduction=_small(method, kw))
  else:
    m = Model(1000, variant="Ti/16", reduction=dict(method=method, **kw))
  ours = flops.macs(m)
  image = jnp.zeros((1, m.image_size, m.image_size, m.channels))
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), image))  # one trace for both counts
  # Every matrix product and convolution of the traced inference program (README: 0.1%).
  assert ours == pytest.approx(flops.matmul_macs(m, params), rel=0.001)
  # XLA's count adds the elementwise work (softmax, GELU, LayerNorm): 3 to 20% more
  # (most for narrow models with score heads). On the small geometry only (a DeiT-Ti compile
  # per method is a minute of the suite); the compiled program's count for the dense model,
  # the lowered program's (no compile, within 1.1% of it) for the methods.
  if channels == 1:
    xla = flops.xla_macs(m, params, optimized=method == "none")
    assert 1.03 < xla / ours < 1.2
    if method == "none":  # the lowered program's count (the methods') agrees with the compiled
      assert flops.xla_macs(m, params, optimized=False) == pytest.approx(xla, rel=0.02)


def _small(method, kw):
  if method == "none":
    return None
  if method == "tome":
    return {"method": "tome", "r": 4}
  if method == "pitome":
    return {"method": "pitome", **kw}
  if method == "mctf":
    return {"method": "mctf", **kw, "r": 4 if kw["r"] >= 1 else kw["r"]}
  if method == "diffrate":
    return {"method": "diffrate", **kw}
  return {"method": method, "locations": (2, 4, 6), **kw}


_FIRST = list({m: (m, kw) for m, kw in reversed(METHODS)}.values())[::-1]  # one setting each
CLS_FREE = ([("gap", {}, m, kw) for m, kw in _FIRST if m not in ("dynamicvit", "topk")]
            + [("map", {"rep_size": 48}, m, kw) for m, kw in METHODS if m in ("none", "etps",
                                                                            "tome", "pitome")]
            + [("0", {"posemb": "sincos2d"}, m, kw) for m, kw in METHODS
               if m in ("dtps", "evit")])


@pytest.mark.parametrize("pool,extra,method,kw", CLS_FREE)
def test_cls_free_models_match_the_traced_matmuls(pool, extra, method, kw):
  """Without a cls token (and with a MAP head, pre-logits, a protected token 0) the count
  still equals the traced program's matrix products (one score row per intra-block stage,
  as for cls)."""
  m = Model(10, width=96, depth=8, num_heads=3, mlp_dim=384, patch_size=4, image_size=28,
            channels=1, pool_type=pool, reduction=_small(method, kw), **extra)
  assert flops.macs(m) == pytest.approx(flops.matmul_macs(m), rel=0.002)
