"""MCTF against the authors' own operator and model (tests/goldens/mctf, scripts/mctf_goldens.py)."""

import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax.ops import mctf

GOLDENS = pathlib.Path(__file__).parent / "goldens" / "mctf"
CASES = sorted(p.stem for p in GOLDENS.glob("*.npz") if p.stem != "deit")
POOLING = {1: "attn", 0: "size", 3: "mean"}  # the authors' pooling_type


def _ours(g, **override):
  """The authors' call through our operator: (x, size, new_index, rows)."""
  kw = dict(tau_sim=float(g["tau_sim"]), tau_info=float(g["tau_info"]),
            tau_size=float(g["tau_size"]), bidirection=bool(g["bidirection"]),
            protected=int(g["protected"]))
  kw.update(override)
  t, r = g["x"].shape[1], int(g["r"])
  size = jnp.asarray(g["size"][..., 0]) if "size" in g else None
  received = jnp.asarray(g["attn"].mean((1, 2)))
  new_index = jax.jit(lambda x, a, s: mctf.mctf_match(x, a, s, r, **kw))(
      jnp.asarray(g["x"]), received, size)
  weights = mctf.pooling_weights(received, size, POOLING[int(g["pooling_type"])],
                                 received.shape)
  x, size, _ = mctf.mctf_merge(jnp.asarray(g["x"]), size, weights, new_index, t - r)
  rows = mctf.merge_rows(new_index, weights, t - r)  # the merge as one matrix (reference)
  np.testing.assert_allclose(np.einsum("bto,btc->boc", rows, g["x"]), x, rtol=1e-5, atol=1e-6)
  return np.asarray(x), np.asarray(size), np.asarray(new_index), np.asarray(rows)


def test_goldens_cover_the_options():
  assert len(CASES) == 7
  gs = [dict(np.load(GOLDENS / f"{c}.npz")) for c in CASES]
  assert {int(g["pooling_type"]) for g in gs} == {0, 1, 3}
  assert {int(g["bidirection"]) for g in gs} == {0, 1}
  assert {int(g["one_step_ahead"]) for g in gs} == {0, 1}
  assert {int(g["protected"]) for g in gs} == {0, 1}


@pytest.mark.parametrize("case", CASES)
def test_equals_the_authors_fusion(case):
  g = dict(np.load(GOLDENS / f"{case}.npz"))
  x, size, new_index, rows = _ours(g)
  t, r = g["x"].shape[1], int(g["r"])
  assert x.shape == g["x_out"].shape == (2, t - r, 12)
  np.testing.assert_allclose(x, g["x_out"], rtol=1e-5, atol=1e-6)  # same tokens, same order
  np.testing.assert_allclose(size, g["size_out"][..., 0], rtol=1e-6)
  want = g["size"].sum((1, 2)) if "size" in g else t
  np.testing.assert_allclose(size.sum(1), want, rtol=1e-6)  # sizes kept
  if "attn_out" in g:
    # One step ahead: their merged attention matrix (keys summed, queries averaged by the
    # pooling weights) is rows^T attn onehot; the model applies it to values without forming it.
    onehot = np.asarray(jax.nn.one_hot(new_index, t - r))
    merged = np.einsum("bqo,bhqk,bkp->bhop", rows, g["attn"], onehot)
    np.testing.assert_allclose(merged, g["attn_out"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["default", "first_merge", "cls_free"])
def test_the_multi_criteria_weight_decides_the_match(case):
  # Similarity alone (ToMe's criterion, no informativeness or size): another set merges.
  g = dict(np.load(GOLDENS / f"{case}.npz"))
  x, *_ = _ours(g, tau_info=0.0, tau_size=0.0)
  assert not np.allclose(x, g["x_out"], rtol=1e-5, atol=1e-6)


def test_the_similarity_criterion_matters_too():
  g = dict(np.load(GOLDENS / "info_size_only.npz"))  # its golden has tau_sim 0
  x, *_ = _ours(g, tau_sim=1.0)
  assert not np.allclose(x, g["x_out"], rtol=1e-5, atol=1e-6)


def test_operator_checks_its_arguments_and_protects_cls():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 11, 8)), jnp.float32)
  idx = np.asarray(mctf.mctf_match(x, None, None, 5, tau_info=0.0))
  assert idx.shape == (2, 11) and (idx[:, 0] == 0).all()  # cls stays first, alone
  assert all(np.bincount(row, minlength=6).tolist().count(0) == 0 for row in idx)
  assert (np.bincount(idx[0])[0] == 1)
  with pytest.raises(ValueError, match="r=6 is out of range"):
    mctf.mctf_match(x, None, None, 6, tau_info=0.0)  # (11 - 1) // 2 = 5 at most
  with pytest.raises(ValueError, match="needs attn"):
    mctf.mctf_match(x, None, None, 2)
  for p in (2, 5):  # cls and registers: each alone, first, in order; both directions
    idx = np.asarray(mctf.mctf_match(x, None, None, (11 - p) // 2, tau_info=0.0, protected=p))
    np.testing.assert_array_equal(idx[:, :p], np.broadcast_to(np.arange(p), (2, p)))
    assert all((np.bincount(row)[:p] == 1).all() for row in idx)
  with pytest.raises(ValueError, match="attn must have shape"):
    mctf.mctf_match(x, jnp.ones((2, 10)), None, 2)
  with pytest.raises(ValueError, match="unknown MCTF pooling 'max'"):
    mctf.pooling_weights(None, None, "max", (2, 11))


def test_the_plan_follows_the_authors_arithmetic_and_checks_its_spec():
  from tps_jax.methods import Reduction  # pylint: disable=g-import-not-at-top
  plan = Reduction.create({"method": "mctf"}, depth=12, num_patches=196)
  assert plan.options.r == (0,) + (16,) * 11 and plan.options.tau_info == 20.0  # their DeiT run
  assert plan.tokens_per_block()[-1] == 197 - 176
  fast = Reduction.create({"method": "mctf", "r": 0.35, "locations": (3, 6, 9)}, depth=12,
                          num_patches=196)
  assert fast.options.r[3] == 68 and fast.options.r[6] == 44 and fast.options.r[9] == 29
  small = Reduction.create({"method": "mctf", "r": 16}, depth=4, num_patches=49)
  assert small.options.r == (0, 16, 16, 8)  # at least 10 tokens stay: 50 -> 34 -> 18 -> 10
  after = Reduction.create({"method": "mctf", "r": 8, "one_step_ahead": 0}, depth=3,
                           num_patches=64)
  assert after.tokens_per_block() == (65, 65, 57)  # merges after the block's MLP
  assert Reduction.create(plan, depth=12, num_patches=196) == plan
  for bad, match in (({"keep_ratio": 0.5}, "takes no keys \\['keep_ratio'\\]"),
                     ({"pooling": "max"}, "unknown mctf pooling 'max'"),
                     ({"one_step_ahead": 3}, "one_step_ahead must be one of"),
                     ({"tau_info": -1}, "tau_info must be a number >= 0"),
                     ({"r": 2.5}, "counts or fractions"),
                     ({"locations": (12,)}, "outside the model's blocks"),
                     ({"r": [1, 2]}, "lists 2 values")):
    with pytest.raises(ValueError, match=match):
      Reduction.create({"method": "mctf", **bad}, depth=12, num_patches=196)
  with pytest.raises(ValueError, match="'tome' takes no keys \\['tau_sim'\\]"):
    Reduction.create({"method": "tome", "r": 4, "tau_sim": 1}, depth=12, num_patches=196)


def _variant_spec(g, name):
  t = g[f"mctf_type:{name}"]
  r = float(t[0])
  return dict(method="mctf", r=int(r) if r >= 1 else r,
              locations=tuple(int(l) for l in g[f"layers:{name}"]), prop_attn=bool(t[3]),
              one_step_ahead=int(t[4]), tau_sim=float(t[5]), tau_info=float(t[6]),
              tau_size=float(t[7]), bidirection=bool(t[8]), pooling=POOLING[int(t[9])])


DEIT = dict(np.load(GOLDENS / "deit.npz"))


@pytest.mark.parametrize("variant", [str(v) for v in DEIT["variants"]])
def test_model_equals_the_authors_mctf_deit(variant):
  # Their models/deit.py with their block and attention (timm 0.5.4), loaded from the same
  # state dict: the same logits, one step ahead or not, bidirectional or not, every pooling.
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  g = DEIT
  sd = {k[3:]: v for k, v in g.items() if k.startswith("sd:")}
  model = Model(5, width=48, depth=4, num_heads=3, mlp_dim=192, patch_size=8, image_size=64,
                layout="deit", reduction=_variant_spec(g, variant))
  params = checkpoints.from_torch_state_dict(sd, model)
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def infer(p, x):
    return model.apply({"params": p}, x)

  logits, out = infer(params, g["images"])
  infer(params, g["images"] + 1.0)
  np.testing.assert_allclose(logits, g[f"logits:{variant}"], rtol=1e-5, atol=2e-5)
  assert out["encoded"].shape[1] == 65 - sum(model.reduction.options.r)
  assert not np.allclose(g[f"logits:{variant}"], g["logits:dense"], atol=1e-3)  # it merged


def test_model_trains_through_mctf_with_finite_gradients_in_every_layout():
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 28, 28, 1)), jnp.float32)
  geometry = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4, image_size=28,
                  channels=1)
  spec = {"method": "mctf", "r": 8, "locations": (0, 1)}
  model = Model(10, reduction=spec, **geometry)
  params = jax.jit(model.init)(jax.random.key(0), images)["params"]
  loss = lambda p: jnp.mean(model.apply({"params": p}, images, train=True)[0] ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value))
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), path
  # the queries and keys learn through the merged attention matrix (one step ahead)
  assert float(jnp.abs(grads["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]
                       ["query"]["kernel"]).sum()) > 0
  # scan stacks the same blocks: the same logits from the same (restacked) parameters
  scan_model = Model(10, reduction=spec, scan=True, **geometry)
  blocks = [params["Transformer"][f"encoderblock_{i}"] for i in range(2)]
  stacked = dict(params, Transformer={
      "encoderblock": jax.tree.map(lambda *t: jnp.stack(t), *blocks),
      "encoder_norm": params["Transformer"]["encoder_norm"]})
  infer = lambda m, p: jax.jit(lambda p: m.apply({"params": p}, images))(p)
  np.testing.assert_allclose(infer(scan_model, stacked)[0], infer(model, params)[0],
                             rtol=1e-5, atol=1e-5)
  # a cls-free (GAP) model: nothing protected, pooling weighs each token by its size
  gap = Model(10, reduction=spec, pool_type="gap", **geometry)
  logits, out = infer(gap, jax.jit(gap.init)(jax.random.key(0), images)["params"])
  assert logits.shape == (2, 10) and out["encoded"].shape[1] == 49 - 16
  np.testing.assert_allclose(out["sizes"].sum(1), 49.0, rtol=1e-6)
