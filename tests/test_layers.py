"""Transformer layers: big_vision names, and the policy / bias / cls-attention paths."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax.models.layers import Encoder1DBlock, MultiHeadDotProductAttention, PatchEmbedding
from conftest import tokens


def _init_block(x, **kw):
  block = Encoder1DBlock(mlp_dim=32, **{"num_heads": 2, **kw})
  return block, block.init(jax.random.key(0), x)


def test_parameter_names_follow_big_vision():
  x = tokens(0, 2, 5, 8)
  _, params = _init_block(x)
  p = params["params"]
  assert set(p) == {"LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"}
  attn = p["MultiHeadDotProductAttention_0"]
  assert set(attn) == {"query", "key", "value", "out"}
  chex.assert_shape([attn["query"]["kernel"], attn["out"]["kernel"]], [(8, 2, 4), (2, 4, 8)])
  assert set(p["MlpBlock_0"]) == {"Dense_0", "Dense_1"}


def test_patch_embedding_is_the_strided_convolution():
  # Same parameters (names, shapes, initial values) and result as nn.Conv with stride p, so
  # big_vision and imported checkpoints mean the same; patches in row-major order.
  image = jax.random.normal(jax.random.key(0), (2, 12, 8, 3))
  ours = PatchEmbedding(5, 4)
  conv = nn.Conv(5, (4, 4), strides=(4, 4), padding="VALID")
  params = ours.init(jax.random.key(1), image)
  chex.assert_trees_all_equal(params, conv.init(jax.random.key(1), image))
  params = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(2), a.shape), params)
  want = conv.apply(params, image).reshape(2, 6, 5)
  np.testing.assert_allclose(ours.apply(params, image), want, rtol=1e-5, atol=1e-5)
  low = PatchEmbedding(5, 4, dtype=jnp.bfloat16).apply(params, image)
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), want, rtol=0.05, atol=0.1)
  with pytest.raises(ValueError, match="does not split into 4x4 patches"):
    ours.init(jax.random.key(1), jnp.zeros((1, 10, 8, 3)))


def test_full_policy_equals_plain_attention_and_halves_compose():
  x = tokens(1, 2, 6, 8)
  block, params = _init_block(x)
  plain = block.apply(params, x)
  with_policy = block.apply(params, x, policy=jnp.ones((2, 6)))
  np.testing.assert_allclose(plain, with_policy, atol=1e-5)
  halves = block.apply(params, x, method=lambda m, x: m.feed(m.attend(x)[0]))
  np.testing.assert_allclose(plain, halves, atol=1e-6)


@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_cls_attention_matches_full_softmax_row_and_the_primitives_compose(impl):
  x = tokens(2, 2, 7, 8)
  block, params = _init_block(x, implementation=impl)
  bias = jnp.log(jnp.arange(1.0, 8.0))[None, None, None, :].repeat(2, 0)
  y, out = block.apply(params, x, bias=bias, method="attend")
  q, k, v = block.apply(params, x, method="qkv")
  chex.assert_shape([q, k, v], (2, 7, 2, 4))
  p = params["params"]["MultiHeadDotProductAttention_0"]
  ln = nn.LayerNorm(epsilon=1e-6).apply({"params": params["params"]["LayerNorm_0"]}, x)
  proj = lambda name: np.einsum("bnd,dhk->bnhk", ln, p[name]["kernel"]) + p[name]["bias"]
  np.testing.assert_allclose(q, proj("query"), atol=1e-5)
  np.testing.assert_allclose(k, proj("key"), atol=1e-5)
  logits = np.einsum("bhk,bnhk->bhn", q[:, 0], k) / np.sqrt(4) + np.asarray(bias)[:, :, 0]
  np.testing.assert_allclose(out.cls_attn, jax.nn.softmax(logits, -1), atol=1e-5)
  np.testing.assert_allclose(out.keys, k.mean(axis=2), atol=1e-5)
  np.testing.assert_allclose(out.values, v, atol=1e-6)
  # The first half is residual(x, attention(q, k, v)); probs' first row is the cls row.
  mixed = block.apply(params, q, k, v, bias=bias, method="attention")
  np.testing.assert_allclose(block.apply(params, x, mixed, method="residual"), y, atol=1e-5)
  probs = block.apply(params, q, k, bias=bias, method="probs")
  chex.assert_shape(probs, (2, 2, 7, 7))
  np.testing.assert_allclose(probs[:, :, 0], out.cls_attn, atol=1e-5)
  with pytest.raises(ValueError, match="under a policy takes no bias"):
    block.apply(params, q, k, v, bias=bias, policy=jnp.ones((2, 7)), method="attention")


def test_policy_drops_tokens_from_others_view():
  # With token 3 dropped, changing it must not change what the other tokens see.
  x = tokens(3, 1, 5, 8)
  block, params = _init_block(x)
  pi = jnp.array([[1.0, 1, 1, 0, 1]])
  y1 = block.apply(params, x, policy=pi)
  x2 = x.copy(); x2[0, 3] += 5.0
  y2 = block.apply(params, x2, policy=pi)
  np.testing.assert_allclose(np.delete(y1, 3, 1), np.delete(y2, 3, 1), atol=1e-4)


def test_bfloat16_block():
  x = jnp.asarray(tokens(4, 2, 5, 8), jnp.bfloat16)
  block, params = _init_block(x, dtype=jnp.bfloat16)
  chex.assert_type(block.apply(params, x), jnp.bfloat16)


def test_xla_and_einsum_attention_agree():
  x = tokens(5, 2, 7, 12)
  bias = jnp.log(jnp.arange(1.0, 8.0))[None, None, None, :].repeat(2, 0)
  outs = {}
  for impl in ("einsum", "xla"):
    block, params = _init_block(x, implementation=impl, num_heads=3)
    outs[impl] = block.apply(params, x, bias=bias, method="attend")
  np.testing.assert_allclose(outs["einsum"][0], outs["xla"][0], atol=1e-5)
  np.testing.assert_allclose(outs["einsum"][1].cls_attn, outs["xla"][1].cls_attn, atol=1e-5)
  with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
    MultiHeadDotProductAttention(num_heads=3, implementation="flash").init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="unknown attention implementation 'fused'"):
    MultiHeadDotProductAttention(num_heads=3, implementation="fused").init(jax.random.key(0), x)


def test_cudnn_gets_the_size_bias_in_q_dtype(monkeypatch):
  """ToMe's proportional-attention bias is float32; cuDNN needs it in q's dtype (bfloat16).
  The cuDNN call is recorded here (no GPU on CPU) and answered by XLA's attention."""
  from tps_jax import ops  # pylint: disable=g-import-not-at-top
  seen = []

  def fake(q, k, v, *, bias=None, scale=None, implementation="xla", **kw):
    seen.append((implementation, None if bias is None else bias.dtype, q.dtype))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, scale=scale, implementation="xla")

  monkeypatch.setattr(ops, "dot_product_attention", fake)
  attn = MultiHeadDotProductAttention(2, dtype=jnp.bfloat16, implementation="cudnn")
  x = jnp.ones((1, 6, 16), jnp.bfloat16)
  params = attn.init(jax.random.key(0), x)
  bias = jnp.log(jnp.arange(1, 7, dtype=jnp.float32))[None, None, None, :]
  attn.apply(params, x, bias=bias)
  assert seen[-1] == ("cudnn", jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.bfloat16))


def test_attend_gives_the_values_so_a_method_can_weigh_attention_by_them():
  """`attend` returns the value vectors: a score such as ATS's (cls attention x value norm)
  is then a function of what the block gives, computed here two ways."""
  x = tokens(3, 2, 5, 8)
  block, params = _init_block(x)
  y, info = block.apply(params, x, method="attend")
  p = params["params"]
  ln = nn.LayerNorm(epsilon=1e-6).apply({"params": p["LayerNorm_0"]}, x)
  value = p["MultiHeadDotProductAttention_0"]["value"]
  expected = jnp.einsum("bnd,dhk->bnhk", ln, value["kernel"]) + value["bias"]
  chex.assert_shape(info.values, (2, 5, 2, 4))
  np.testing.assert_allclose(info.values, expected, rtol=1e-5, atol=1e-6)
  score = jnp.mean(info.cls_attn, 1) * jnp.linalg.norm(info.values.reshape(2, 5, 8), axis=-1)
  assert np.isfinite(np.asarray(score)).all() and score.shape == (2, 5)
  _, matrix_info = block.apply(params, x, method="attend_matrix")
  np.testing.assert_allclose(matrix_info.values, info.values, rtol=1e-6)
