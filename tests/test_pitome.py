"""PiToMe against the authors' own operator (tests/goldens/pitome, scripts/pitome_goldens.py)."""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax import ops
from tps_jax.ops import pitome

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "pitome"
CASES = sorted(p.stem for p in GOLDENS.glob("*.npz"))
OPERATOR_CASES = [c for c in CASES if c != "deit"]


def _ours(g, **kw):
  """The authors' call (cls first, protected) through our operator."""
  t = g["metric"].shape[1] - 1
  r = math.floor(t - t * float(g["ratio"]))
  matching = "bsm" if int(g["bsm"]) else "pitome"
  kw = {"margin": float(g["margin"]), "matching": matching, **kw}
  new_index = jax.jit(lambda m: pitome.pitome_match(m, r, **kw))(jnp.asarray(g["metric"][:, 1:]))
  x, size = ops.merge_by_index(jnp.asarray(g["x"][:, 1:]), jnp.asarray(g["size"][:, 1:, 0]),
                                  new_index, t - r)
  x = np.concatenate([g["x"][:, :1], np.asarray(x)], axis=1)
  size = np.concatenate([g["size"][:, :1, 0], np.asarray(size)], axis=1)
  return x, size, np.asarray(new_index), r


def test_goldens_cover_both_matchings():
  assert len(CASES) == 6 and {c.split("_")[0] for c in CASES} == {"bsm", "pitome", "deit"}


@pytest.mark.parametrize("case", OPERATOR_CASES)
def test_equals_the_authors_merge(case):
  g = dict(np.load(GOLDENS / f"{case}.npz"))
  x, size, _, r = _ours(g)
  assert r > 0 and x.shape == g["x_out"].shape
  np.testing.assert_allclose(x, g["x_out"], rtol=1e-5, atol=1e-6)  # same tokens, same order
  np.testing.assert_allclose(size, g["size_out"][..., 0], rtol=1e-6)
  np.testing.assert_allclose(size.sum(1), g["size"].sum((1, 2)), rtol=1e-6)  # sizes kept


@pytest.mark.parametrize("case", ["pitome_m0375_r07", "bsm_m05_r07"])
def test_the_energy_decides_which_tokens_may_merge(case):
  # Without the energy (every token equally "crowded") another set merges: the golden fails.
  g = dict(np.load(GOLDENS / f"{case}.npz"))
  real = pitome.energy_scores
  flat = lambda m, margin, alpha=1.0: (real(m, margin, alpha)[0],
                                       jnp.zeros(m.shape[:2], jnp.float32))
  pitome.energy_scores = flat
  try:
    x, _, _, _ = _ours(g)
  finally:
    pitome.energy_scores = real
  assert not np.allclose(x, g["x_out"], rtol=1e-5, atol=1e-6)


def test_pitome_protects_isolated_tokens_and_checks_its_arguments():
  # Two tight clusters and two lone tokens: the lone ones (lowest energy) are never merged.
  rng = np.random.default_rng(0)
  centres = np.eye(6)[:2] * 5
  metric = np.concatenate([centres[0] + 0.05 * rng.normal(size=(6, 6)),
                           centres[1] + 0.05 * rng.normal(size=(6, 6)),
                           np.eye(6)[2:4] * 5], 0)[None].astype(np.float32)
  new_index = np.asarray(pitome.pitome_match(jnp.asarray(metric), 6, margin=0.5))
  counts = np.bincount(new_index[0], minlength=8)
  assert counts.sum() == 14 and (counts[new_index[0, 12:]] == 1).all()  # lone: alone
  with pytest.raises(ValueError, match="unknown PiToMe matching 'greedy'"):
    pitome.pitome_match(jnp.asarray(metric), 2, margin=0.5, matching="greedy")
  with pytest.raises(ValueError, match="r"):
    pitome.pitome_match(jnp.asarray(metric), 8, margin=0.5)  # 2r > T


def test_the_plan_follows_the_authors_deit_patch_and_checks_its_spec():
  from tps_jax.methods import Reduction  # pylint: disable=g-import-not-at-top
  plan = Reduction.create({"method": "pitome", "keep_ratio": 0.9}, depth=12, num_patches=196)
  o = plan.options
  # r = floor(T - T * ratio) of the T patch tokens each block sees; cls never merges.
  assert o.r == (19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6)
  assert o.margins[0] == 0.75 and o.margins[6] == 0.375 and o.bsm_blocks == 6
  assert plan.tokens_per_block()[-1] == 1 + 196 - sum(o.r)
  assert Reduction.create(plan, depth=12, num_patches=196) == plan  # a plan passes as it is
  with pytest.raises(ValueError, match="made for depth 12, the model has 8"):
    Reduction.create(plan, depth=8, num_patches=196)
  for bad, match in (({"keep_ratio": 0.4}, "in \\[0.5, 1\\]"),
                     ({"keep_ratio": 0.9, "locations": (3,)}, "takes no keys \\['locations'\\]"),
                     ({"keep_ratio": 0.9, "margins": (0.5,)}, "margins list 1 values"),
                     ({"keep_ratio": 0.9, "bsm_blocks": 13}, "bsm_blocks must be in")):
    with pytest.raises(ValueError, match=match):
      Reduction.create({"method": "pitome", **bad}, depth=12, num_patches=196)


@pytest.mark.parametrize("ratio", [1.0, 0.9, 0.8, 0.7])
def test_model_equals_the_authors_patched_timm_deit(ratio):
  # The authors' algo/pitome/patch/deit.py on timm 0.4.12's DeiT (tests/goldens/pitome/
  # deit.npz), loaded from the same state dict: the same logits.
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  g = dict(np.load(GOLDENS / "deit.npz"))
  sd = {k[3:]: v for k, v in g.items() if k.startswith("sd:")}
  model = Model(5, width=48, depth=4, num_heads=3, mlp_dim=192, patch_size=8, image_size=64,
                layout="deit", reduction={"method": "pitome", "keep_ratio": ratio})
  params = checkpoints.from_torch_state_dict(sd, model)
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, g["images"])
  np.testing.assert_allclose(logits, g[f"logits:{ratio}"], rtol=1e-5, atol=2e-5)
  assert out["encoded"].shape[1] == 1 + 64 - sum(model.reduction.options.r)
  if ratio < 1:
    assert not np.allclose(g[f"logits:{ratio}"], g["logits:1.0"], atol=1e-3)  # it merged
