"""The ViT with reduction stages: the authors' golden dTPS model, methods, shapes, errors."""

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax import checkpoints
from tps_jax.models.vit import Model
from conftest import golden, jit_apply, jit_init

SMALL = dict(width=48, depth=4, num_heads=3, mlp_dim=96, patch_size=8, image_size=32)  # 16 patches


def small(method="none", **red):
  if method == "tome":
    red.setdefault("r", 2)
  elif method not in ("none", "pitome"):
    red.setdefault("locations", (1, 2))
  return Model(5, reduction=dict(method=method, **red), **SMALL)


def images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


@pytest.fixture(scope="module")
def golden_model():
  g = golden("model_small")
  sd = {k[2:]: g[k] for k in g if k.startswith("w/")}
  model = Model(10, width=96, depth=6, num_heads=3, patch_size=8, image_size=64,
                reduction=dict(method="dtps", locations=(1, 3, 4), keep_ratio=0.6),
                gumbel_noise=False)
  params = checkpoints.from_torch_state_dict(sd, model)
  return g, sd, model, params, jnp.asarray(g["images_nchw"].transpose(0, 2, 3, 1))


class TestGolden:

  def test_eval_logits(self, golden_model):
    g, _, model, params, x = golden_model
    logits, out = jit_apply(model, {"params": params}, x, train=False)
    np.testing.assert_allclose(logits, g["logits_eval"], atol=1e-4)
    chex.assert_shape(out["keep_indices"], [(4, 38), (4, 23), (4, 13)])

  @pytest.mark.parametrize("form", ["exact", "deferred"])
  def test_train_logits_and_decisions(self, golden_model, form):
    g, _, model, params, x = golden_model
    logits, out = jit_apply(model.clone(policy_form=form), {"params": params}, x, train=True)
    np.testing.assert_allclose(logits, g["logits_train"], atol=1e-4)
    np.testing.assert_array_equal(np.round(np.stack(out["decisions"])), g["train_keep_decisions"])

  @pytest.mark.parametrize("form", ["fused", "log_bias"])
  def test_fused_policy_attention_is_close_to_the_authors(self, golden_model, form):
    g, _, model, params, x = golden_model
    logits, out = jit_apply(model.clone(policy_form=form), {"params": params}, x, train=True)
    deviation = np.abs(np.asarray(logits) - g["logits_train"]).max()
    assert deviation < 1e-3, deviation  # the README's policy attention section quotes it
    np.testing.assert_array_equal(np.round(np.stack(out["decisions"])), g["train_keep_decisions"])

  def test_big_vision_layout_gives_same_logits(self, golden_model):
    g, sd, model, _, x = golden_model
    bv = Model(10, width=96, depth=6, num_heads=3, patch_size=8, image_size=64,
               layout="big_vision", gelu="exact",  # a timm checkpoint: PyTorch's GELU
               reduction=dict(method="dtps", locations=(1, 3, 4), keep_ratio=0.6))
    params = checkpoints.from_torch_state_dict(sd, bv)
    chex.assert_shape(params["pos_embedding"], (1, 64, 96))
    logits, _ = jit_apply(bv, {"params": params}, x, train=False)
    np.testing.assert_allclose(logits, g["logits_eval"], atol=1e-4)

  def test_timm_checkpoint_refuses_the_tanh_gelu(self, golden_model):
    _, sd, _, _, _ = golden_model
    bv = Model(10, width=96, depth=6, num_heads=3, patch_size=8, image_size=64,
               layout="big_vision")  # big_vision's default: flax's tanh GELU
    assert bv.gelu == "tanh"
    with pytest.raises(ValueError, match="exact .erf. GELU.*model_kwargs"):
      checkpoints.from_torch_state_dict(sd, bv)

  def test_eval_hosts_are_kept_patches(self, golden_model):
    _, _, model, params, x = golden_model
    _, out = jit_apply(model, {"params": params}, x, train=False)
    for dec, hosts in zip(out["decisions"], out["hosts"]):
      dec, hosts = np.asarray(dec), np.asarray(hosts)
      pruned_here = hosts >= 0
      assert pruned_here.any()
      assert (dec[pruned_here] == 0).all()  # pruned patches are not kept ...
      rows = np.nonzero(pruned_here)[0]
      assert (dec[rows, hosts[pruned_here]] == 1).all()  # ... and their hosts are


class TestRemat:
  """The fused policy attention under remat (every method's remat gradients: test_methods)."""

  @staticmethod
  def _loss_and_params(method, remat, **kw):
    # A stage at every block, so a block left out of remat cannot hide behind the others.
    red = {"r": 2} if method == "tome" else {} if method == "none" else {
        "r": 4, "locations": (0, 1)} if method == "mctf" else {
        "locations": (0, 1), "keep_ratio": 0.8}
    # 64 patches, 4 heads: activations, not parameters, dominate what the backward pass keeps.
    model = Model(5, reduction=dict(method=method, **red), remat=remat, drop_path=0.2,
                  **{**SMALL, "width": 32, "depth": 2, "num_heads": 4, "mlp_dim": 64,
                     "patch_size": 4}, **kw)
    x = images(b=4)
    rngs = {"params": jax.random.key(0), "gumbel": jax.random.key(1),
            "dropout": jax.random.key(2)}
    params = jit_init(model, rngs, x, train=True)["params"]
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True, rngs=rngs)[0] ** 2)
    return loss, params

  def test_fused_policy_attention_under_remat_has_the_exact_gradients(self):
    # The fused form's custom VJP keeps a closure as a residual; remat must recompute it, and
    # the gradients (the score head's through the policy included) must stay docs/method.md's.
    grads = {}
    for form, remat in (("exact", False), ("fused", True)):
      loss, params = self._loss_and_params("dtps", remat, policy_form=form)
      grads[form] = jax.jit(jax.grad(loss))(params)
    chex.assert_trees_all_close(grads["fused"], grads["exact"], rtol=1e-3, atol=1e-3)



def test_scanned_learned_stage_blocks_stay_rematerialised():
  """With scan, a learned method's stage block runs as one step of the scan (rematerialised
  with remat_policy): only the embedding and head matmuls are outside it."""
  model = Model(5, reduction=dict(method="dtps", keep_ratio=0.8, locations=(0, 1)), scan=True,
                **{**SMALL, "depth": 2})
  x = images()
  rngs = {"params": jax.random.key(0), "gumbel": jax.random.key(1)}
  params = jax.eval_shape(lambda: model.init(rngs, x, train=True))["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True, rngs=rngs)[0] ** 2)
  top = [e.primitive.name for e in jax.make_jaxpr(loss)(params).jaxpr.eqns]
  # embedding and head, the 2 score heads' 4 Dense layers, each masked squeeze's 2 products:
  # no block matmul outside the scan (run outside it, each block's 8 would add 16)
  assert top.count("dot_general") == 2 + 2 * 4 + 2 * 2


@pytest.mark.parametrize("method", ["dtps", "dynamicvit"])
def test_learned_training_path(method):
  model = small(method, keep_ratio=0.6)
  x = images()
  params = jit_init(model, {"params": jax.random.key(0), "gumbel": jax.random.key(1)}, x,
                    train=True)["params"]

  def loss(p, rng):
    logits, out = model.apply({"params": p}, x, train=True, rngs={"gumbel": rng})
    return jnp.mean(logits ** 2) + sum(jnp.mean(d) for d in out["decisions"]), out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params,
                                                                   jax.random.key(2))
  chex.assert_tree_all_finite(grads)
  # The keep decisions reach the score heads through the straight-through estimator.
  assert np.abs(np.asarray(grads["Transformer"]["score_head_0"]["Dense_3"]["kernel"])).sum() > 0
  chex.assert_shape(out["encoded"], (2, 17, 48))  # fixed shape in training
  for prev, cur in zip([np.ones((2, 16))] + out["decisions"], out["decisions"]):
    cur = np.asarray(cur)
    assert set(np.unique(np.round(cur)).tolist()) <= {0.0, 1.0}
    assert (np.round(cur) <= np.round(prev)).all()  # once dropped, always dropped
  with pytest.raises(Exception, match="gumbel"):
    model.apply({"params": params}, x, train=True)  # noise needs its rng stream


def test_big_vision_parameter_names():
  model = small("dtps")
  params = jit_init(model, jax.random.key(0), images())["params"]
  names = set(flax.traverse_util.flatten_dict(params, sep="/"))
  for name in ("embedding/kernel", "cls", "pos_embedding", "head/kernel",
               "Transformer/encoder_norm/scale",
               "Transformer/encoderblock_0/LayerNorm_0/scale",
               "Transformer/encoderblock_3/MultiHeadDotProductAttention_0/query/kernel",
               "Transformer/encoderblock_3/MlpBlock_0/Dense_1/kernel",
               "Transformer/score_head_1/Dense_3/kernel"):
    assert name in names, name


@pytest.mark.parametrize("kw,match", [
    (dict(reduction=dict(method="prune")), "unknown reduction method 'prune'"),
    (dict(reduction=dict(method="dtps", locations=(1, 4))), r"locations \[4\] are outside"),
    (dict(reduction=dict(method="etps", keep_ratio=1.5)), "keep_ratio must be in"),
    (dict(reduction=dict(method="etps", keep_ratio=0.0)), "keep_ratio must be in"),
    (dict(reduction=dict(method="evit", keep_counts=(20, 5))), r"must each be in \[1, 16\]"),
    (dict(reduction=dict(method="evit", keep_counts=(5,))), "1 entries for 2 locations"),
    (dict(reduction=dict(method="topk", keep_ratio=0.05)), "keeps no token"),
    (dict(reduction=dict(method="tome", r=9)), "does not fit"),
    (dict(reduction=dict(method="dtps", keep_rate=0.5)), r"'dtps' takes no keys \['keep_rate'\]"),
    (dict(layout="timm"), "unknown layout 'timm'"),
    (dict(image_size=30), "not a multiple of patch_size"),
])
def test_bad_config_fails_at_construction(kw, match):
  cfg = {**SMALL, **kw}
  cfg.setdefault("reduction", None)
  if cfg["reduction"] and cfg["reduction"]["method"] != "tome":
    cfg["reduction"].setdefault("locations", (1, 2))
  with pytest.raises(ValueError, match=match):
    Model(5, **cfg)


def test_variants_and_bad_variant():
  m = Model(1000, variant="S/16")
  assert (m.width, m.depth, m.num_heads, m.mlp_dim, m.patch_size) == (384, 12, 6, 1536, 16)
  assert Model(10, variant="Ti/16", depth=6).depth == 6
  with pytest.raises(ValueError, match="unknown ViT variant 'X/16'"):
    Model(10, variant="X/16")


def test_wrong_image_shape():
  model = small()
  params = jit_init(model, jax.random.key(0), images())
  with pytest.raises(ValueError, match=r"image must be \(B, 32, 32, 3\) NHWC.*\(2, 3, 32, 32\)"):
    model.apply(params, jnp.zeros((2, 3, 32, 32)))
  with pytest.raises(ValueError, match=r"image must be \(B, 32, 32, 3\) NHWC.*\(2, 32, 32, 1\)"):
    model.apply(params, jnp.zeros((2, 32, 32, 1)))
