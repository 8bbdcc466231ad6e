"""DiffRate against the authors' own patched DeiT (tests/goldens/diffrate, scripts/diffrate_goldens.py)."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax.methods import Reduction
from conftest import jit_apply

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
  assert out["encoded"].shape[1] == 1 + model.reduction.options.keep_counts[-1]
  dense = Model(5, **GEOMETRY)
  dense_logits, _ = jit_apply(dense, {"params": checkpoints.from_torch_state_dict(SD, dense)},
                             DEIT["images"])
  assert not np.allclose(dense_logits, DEIT[f"logits:{schedule}"], atol=1e-3)  # it reduced


def test_without_the_merge_the_golden_fails():
  # Pruning the tokens DiffRate merges (top-k at the same counts) gives other logits.
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  spec = _spec("merge_only")
  spec["prune_kept"] = spec["merge_kept"]  # prune straight to the merge count: no merge
  model = Model(5, reduction=spec, **GEOMETRY)
  logits, _ = jit_apply(model, {"params": checkpoints.from_torch_state_dict(SD, model)},
                       DEIT["images"])
  assert not np.allclose(logits, DEIT["logits:merge_only"], rtol=1e-5, atol=2e-5)


def test_the_plan_takes_effective_counts_and_checks_its_spec():
  plan = Reduction.create({"method": "diffrate", "prune_kept": [64, 70, 40, 40],
                           "merge_kept": [64, 50, 50, 20]}, depth=4, num_patches=64)
  # block 0 changes nothing; counts above the tokens left change nothing
  o = plan.options
  assert o.locations == (1, 2, 3) and o.prune_counts == (64, 40, 40)
  assert o.keep_counts == (50, 40, 20)
  assert plan.tokens_per_block() == (65, 51, 41, 21)
  assert plan.tokens() == ((65, 65, 65), (65, 51, 51), (51, 41, 41), (41, 21, 21))
  assert Reduction.create(plan, depth=4, num_patches=64) == plan
  with pytest.raises(ValueError, match="reduces at block 3, the model has 3 blocks"):
    Reduction.create(plan, depth=3, num_patches=64)
  with pytest.raises(ValueError, match="keeps 64 patches, the model has 49"):
    Reduction.create(plan, depth=4, num_patches=49)
  with pytest.raises(ValueError, match="'tome' takes no keys \\['prune_kept'\\]"):
    Reduction.create({"method": "tome", "r": 2, "prune_kept": [5] * 4}, depth=4,
                     num_patches=64)
  for bad, match in (({"merge_kept": [1, 2, 3, 4]}, "needs prune_kept"),
                     ({"prune_kept": [5] * 3, "merge_kept": [5] * 3}, "lists 3 counts"),
                     ({"prune_kept": [0] * 4, "merge_kept": [5] * 4}, "must be >= 1"),
                     ({"prune_kept": [5] * 4, "merge_kept": [5] * 4, "keep_ratio": 0.5},
                      "no keys \\['keep_ratio'\\]")):
    with pytest.raises(ValueError, match=match):
      Reduction.create({"method": "diffrate", **bad}, depth=4, num_patches=64)
  with pytest.raises(ValueError, match="'etps' takes no keys \\['prune_kept'\\]"):
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


def test_search_forward_and_gradients_equal_the_authors():
  # Their training forward (masked, sorted, merged in place) on seeded architecture
  # parameters: the same logits, kept numbers and MACs proxy, and the same gradients of the
  # cross-entropy and of the proxy with respect to every block's distributions.
  import optax  # pylint: disable=g-import-not-at-top
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import rate_search as rs  # pylint: disable=g-import-not-at-top
  model = Model(5, **GEOMETRY)
  params = checkpoints.from_torch_state_dict(SD, model)
  arch = [{k: jnp.asarray(DEIT[f"arch:{k}:{i}"]) for k in ("prune", "merge")} for i in range(4)]
  images, labels = jnp.asarray(DEIT["images"]), jnp.asarray(DEIT["labels"])

  def both(a):
    logits, macs, kept = rs.search_forward(model, params, a, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce, (macs, logits, kept)

  (ce, (macs, logits, kept)), g_ce = jax.jit(jax.value_and_grad(both, has_aux=True))(arch)
  g_macs = jax.jit(jax.grad(lambda a: both(a)[1][0]))(arch)
  np.testing.assert_allclose(logits, DEIT["logits:search"], rtol=1e-5, atol=2e-5)
  np.testing.assert_allclose(ce, DEIT["ce:search"], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(kept), DEIT["kept:search"])
  their_constant = 65 * 48 * 8 * 8 * 3 + 48 * 5  # their embedding (cls counted) and head
  np.testing.assert_allclose(float(macs) + their_constant, DEIT["flops:search"], rtol=1e-6)
  for i in range(4):
    for k in ("prune", "merge"):
      for ours, name in ((g_ce, "grad_ce"), (g_macs, "grad_flops")):
        want = DEIT[f"{name}:{k}:{i}"]
        got = np.asarray(ours[i][k])
        if want.shape != got.shape:  # theirs: no gradient reached it (None)
          assert not np.any(got), (name, k, i)
        else:
          np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
  assert np.abs(DEIT["grad_ce:prune:1"]).max() > 0  # the cross-entropy reaches the rates


def test_a_short_search_gives_a_schedule_every_staged_method_takes():
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import rate_search as rs  # pylint: disable=g-import-not-at-top
  geo = dict(width=16, depth=3, num_heads=2, mlp_dim=32, patch_size=7, image_size=28,
             channels=1)
  model = Model(4, **geo)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  batches = ((images, rng.integers(0, 4, 8)) for _ in range(4))
  found = rs.search(model, params, batches, target_macs=0.5 * flops.macs(model), steps=4,
                    unit=1e4, log_every=2, log=lambda s: None)
  assert len(found.prune_kept) == 3 and found.prune_kept[0] == 16  # block 0 never compresses
  assert len(found.history) == 2 and np.isfinite(found.macs)
  reduced = Model(4, reduction=found.spec(), **geo)
  assert jax.jit(reduced.apply)({"params": params}, images)[0].shape == (8, 4)
  stages = rs.to_stages(found.prune_kept, found.merge_kept, 16)
  assert rs.to_stages((16, 14, 9), (16, 12, 12), 16) == {"locations": (1, 2),
                                                         "keep_counts": (12, 9)}
  for method in ("etps", "topk"):
    if stages["locations"]:
      Model(4, reduction={"method": method, **stages}, **geo)
  with pytest.raises(ValueError, match="needs a cls token"):
    rs.search_forward(Model(4, pool_type="gap", **geo), params, rs.init_arch(16, 3), images)
