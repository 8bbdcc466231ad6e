"""VisionZip against its authors' code (goldens from scripts/visionzip_goldens.py: their
CLIP-tower forward on a seeded 24-layer tower), and its bookkeeping."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax.methods import visionzip
from tps_jax.models.vit import Encoder, Model, resolve_reduction

GOLDEN = pathlib.Path(__file__).parent / "goldens" / "visionzip" / "visionzip.npz"
CASES = ("d6_c4", "d10_c3", "d3_c7", "d5_c5", "d11_c6")


@pytest.fixture(scope="module")
def golden():
  return dict(np.load(GOLDEN))


def _counts(case):
  d, c = case[1:].split("_c")
  return int(d) - 1, int(c)  # theirs counts the cls token among the dominant ones


@pytest.mark.parametrize("case", CASES)
def test_reduction_equals_the_authors(golden, case):
  """Our reduction of the layer's hidden states, by the attention and key metric the authors'
  forward read, gives their tokens in their order, and keeps the patches they kept."""
  dominant, contextual = _counts(case)
  hidden, attn, metric = golden["hidden"], golden["attn"], golden["metric"]
  b, t, _ = hidden.shape
  positions = jnp.broadcast_to(jnp.arange(t - 1, dtype=jnp.int32), (b, t - 1))
  st = visionzip.zip_tokens(jnp.asarray(hidden), jnp.asarray(attn[:, :, 0, 1:].sum(1)),
                            jnp.asarray(metric[:, 1:]), positions, dominant, contextual,
                            num_patches=t - 1, size=jnp.ones((b, t)))
  np.testing.assert_allclose(st.x, golden[f"out:{case}"], rtol=1e-5, atol=1e-5)
  kept = np.sort(golden[f"indices:{case}"][:, 1:] - 1, axis=1)  # theirs in score order
  np.testing.assert_array_equal(st.positions[:, :dominant], kept)
  # Each patch is counted once: kept, a target, or merged into a target (sizes sum to all).
  np.testing.assert_array_equal(np.asarray(st.size).sum(1), t)
  assert st.x.shape[1] == 1 + dominant + contextual
  new_index = np.asarray(st.new_index)
  assert (new_index >= 0).all() and (new_index < st.x.shape[1]).all()
  held = np.stack([np.bincount(row, minlength=st.x.shape[1]) for row in new_index])
  np.testing.assert_array_equal(held, st.size)


def _our_params(golden, depth):
  """The seeded CLIP tower's first `depth` layers as our scanned encoder's parameters."""
  sd, cfg = golden, json.loads(str(golden["config"]))
  h = cfg["num_attention_heads"]
  d = cfg["hidden_size"]

  def layer(i):
    g = lambda name: sd[f"sd:vision_model.encoder.layers.{i}.{name}"]
    heads = lambda name: {"kernel": g(f"self_attn.{name}.weight").T.reshape(d, h, d // h),
                          "bias": g(f"self_attn.{name}.bias").reshape(h, d // h)}
    return {
        "LayerNorm_0": {"scale": g("layer_norm1.weight"), "bias": g("layer_norm1.bias")},
        "LayerNorm_1": {"scale": g("layer_norm2.weight"), "bias": g("layer_norm2.bias")},
        "MultiHeadDotProductAttention_0": {
            "query": heads("q_proj"), "key": heads("k_proj"), "value": heads("v_proj"),
            "out": {"kernel": g("self_attn.out_proj.weight").T.reshape(h, d // h, d),
                    "bias": g("self_attn.out_proj.bias")}},
        "MlpBlock_0": {"Dense_0": {"kernel": g("mlp.fc1.weight").T, "bias": g("mlp.fc1.bias")},
                       "Dense_1": {"kernel": g("mlp.fc2.weight").T, "bias": g("mlp.fc2.bias")}}}
  stack = jax.tree.map(lambda *a: np.stack(a), *[layer(i) for i in range(depth)])
  return {"encoderblock": stack, "encoder_norm": {"scale": np.ones(d, np.float32),
                                                  "bias": np.zeros(d, np.float32)}}


@pytest.mark.parametrize("case", ["d6_c4", "d3_c7"])
def test_our_encoder_reduces_the_clip_tower_as_the_authors(golden, case):
  """The tower's layers 0..22 as our encoder, VisionZip at block 22 (their layer -2): our
  block's cls row and head-mean keys give the tokens their forward returned (compared after
  the encoder's LayerNorm, which our encoder applies last)."""
  dominant, contextual = _counts(case)
  cfg = json.loads(str(golden["config"]))
  depth, n = cfg["num_hidden_layers"] - 1, (cfg["image_size"] // cfg["patch_size"]) ** 2
  red = resolve_reduction(dict(method="visionzip", layer=depth - 1, dominant=dominant,
                               contextual=contextual), depth=depth, num_patches=n, prefix=1,
                          has_cls=True)
  enc = Encoder(depth, cfg["intermediate_size"], cfg["num_attention_heads"], red, n, scan=True,
                name="Transformer")
  x, out = jax.jit(lambda p, x: enc.apply({"params": p}, x))(_our_params(golden, depth),
                                                            jnp.asarray(golden["embed"]))
  want = golden[f"out:{case}"]
  want = (want - want.mean(-1, keepdims=True)) / np.sqrt(want.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(x, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(out["keep_indices"][0][:, :dominant],
                                np.sort(golden[f"indices:{case}"][:, 1:] - 1, axis=1))


SMALL = dict(width=48, depth=4, num_heads=3, mlp_dim=96, patch_size=8, image_size=32)


def test_options_and_their_errors():
  model = lambda **spec: Model(5, **SMALL, reduction=dict(method="visionzip", **spec)).plan()
  o = model().options
  assert (o.layer, o.dominant, o.contextual, o.score) == (2, 4, 1, "cls")  # keep 1/3 of 16
  o = model(keep_ratio=0.5, layer=1).options
  assert (o.layer, o.dominant + o.contextual, o.contextual) == (1, 8, 1)
  o = model(dominant=9, contextual=3).options
  assert (o.dominant, o.contextual) == (9, 3)
  assert Model(5, **SMALL, pool_type="gap", layout="big_vision",
               reduction=dict(method="visionzip")).plan().options.score == "received"
  for spec, match in ((dict(layer=4), "layer=4 is not a block"),
                      (dict(dominant=9), "give both dominant and contextual"),
                      (dict(dominant=9, contextual=8), "must keep between 1 and 16"),
                      (dict(dominant=4, contextual=2, keep_ratio=0.5), "not both"),
                      (dict(keep_ratio=0.0), "keep_ratio must be in"),
                      (dict(ratio=0.5), "takes no keys")):
    with pytest.raises(ValueError, match=match):
      model(**spec)


def test_without_contextual_tokens_the_rest_are_dropped():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 4)), jnp.float32)
  scores = jnp.asarray([[5.0, 1, 4, 2, 3, 0], [0, 1, 2, 3, 4, 5]])
  st = visionzip.zip_tokens(x, scores, x[:, 1:], jnp.broadcast_to(jnp.arange(6), (2, 6)), 3, 0,
                            num_patches=6, size=jnp.ones((2, 7)))
  np.testing.assert_array_equal(st.positions, [[0, 2, 4], [3, 4, 5]])
  np.testing.assert_array_equal(st.size, np.ones((2, 4)))
  np.testing.assert_array_equal(st.new_index[0], [0, 1, -1, 2, -1, 3, -1])
  np.testing.assert_array_equal(st.hosts, -np.ones((2, 6)))
