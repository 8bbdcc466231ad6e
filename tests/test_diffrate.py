"""DiffRate against the authors' own patched DeiT (tests/goldens/diffrate, scripts/diffrate_goldens.py)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax.models.reduction import Reduction

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "diffrate"
DEIT = dict(np.load(GOLDENS / "deit.npz"))
SD = {k[3:]: v for k, v in DEIT.items() if k.startswith("sd:")}
GEOMETRY = dict(width=48, depth=4, num_heads=3, mlp_dim=192, patch_size=8, image_size=64,
                layout="deit")


def _spec(name):  # their kept numbers count cls; ours count patch tokens
  return dict(method="diffrate", prune_kept=[int(c) - 1 for c in DEIT[f"prune:{name}"]],
              merge_kept=[int(c) - 1 for c in DEIT[f"merge:{name}"]])


@pytest.mark.parametrize("schedule", [str(s) for s in DEIT["schedules"]])
def test_model_equals_the_authors_diffrate_deit(schedule):
  # Sorted by cls attention, pruned, the rest merged into the most similar kept token (an
  # unweighted mean, similarity-weighted sizes), proportional attention after: their logits.
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  model = Model(5, reduction=_spec(schedule), **GEOMETRY)
  params = checkpoints.from_torch_state_dict(SD, model)
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, DEIT["images"])
  np.testing.assert_allclose(logits, DEIT[f"logits:{schedule}"], rtol=1e-5, atol=2e-5)
  assert out["encoded"].shape[1] == 1 + model.reduction.keep_counts[-1]
  dense = Model(5, **GEOMETRY)
  dense_logits, _ = dense.apply({"params": checkpoints.from_torch_state_dict(SD, dense)},
                                DEIT["images"])
  assert not np.allclose(dense_logits, DEIT[f"logits:{schedule}"], atol=1e-3)  # it reduced


def test_without_the_merge_the_golden_fails():
  # Pruning the tokens DiffRate merges (top-k at the same counts) gives other logits.
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  spec = _spec("merge_only")
  spec["prune_kept"] = spec["merge_kept"]  # prune straight to the merge count: no merge
  model = Model(5, reduction=spec, **GEOMETRY)
  logits, _ = model.apply({"params": checkpoints.from_torch_state_dict(SD, model)},
                          DEIT["images"])
  assert not np.allclose(logits, DEIT["logits:merge_only"], rtol=1e-5, atol=2e-5)


def test_the_plan_takes_effective_counts_and_checks_its_spec():
  plan = Reduction.create({"method": "diffrate", "prune_kept": [64, 70, 40, 40],
                           "merge_kept": [64, 50, 50, 20]}, depth=4, num_patches=64)
  # block 0 changes nothing; counts above the tokens left change nothing
  assert plan.locations == (1, 2, 3) and plan.prune_counts == (64, 40, 40)
  assert plan.keep_counts == (50, 40, 20)
  assert plan.tokens_per_block(64, 4) == (65, 51, 41, 21)
  assert Reduction.create(plan, depth=4, num_patches=64) == plan
  for bad, match in (({"merge_kept": [1, 2, 3, 4]}, "needs prune_kept"),
                     ({"prune_kept": [5] * 3, "merge_kept": [5] * 3}, "lists 3 counts"),
                     ({"prune_kept": [0] * 4, "merge_kept": [5] * 4}, "must be >= 1"),
                     ({"prune_kept": [5] * 4, "merge_kept": [5] * 4, "keep_ratio": 0.5},
                      "not \\['keep_ratio'\\]")):
    with pytest.raises(ValueError, match=match):
      Reduction.create({"method": "diffrate", **bad}, depth=4, num_patches=64)
  with pytest.raises(ValueError, match="are DiffRate's"):
    Reduction.create({"method": "etps", "prune_kept": [5] * 4}, depth=4, num_patches=64)


def test_cls_free_and_scanned_models_run_diffrate():
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)), jnp.float32)
  spec = {"method": "diffrate", "prune_kept": [49, 40, 30], "merge_kept": [49, 30, 20]}
  geo = dict(width=32, depth=3, num_heads=2, mlp_dim=64, patch_size=4, image_size=28,
             channels=1)
  for kw in ({"pool_type": "gap"}, {"scan": True}):
    model = Model(10, reduction=spec, **geo, **kw)
    params = jax.jit(model.init)(jax.random.key(0), images)["params"]
    logits, out = jax.jit(lambda p: model.apply({"params": p}, images))(params)
    assert logits.shape == (2, 10) and np.isfinite(np.asarray(logits)).all()
    assert out["encoded"].shape[1] == 20 + (0 if kw.get("pool_type") == "gap" else 1)
