"""Bad input raises a ValueError naming the argument and shapes, at trace time."""


import jax
import numpy as np
import pytest

import tps_jax
from conftest import tokens

both = pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["eager", "jit"])


@both
def test_squeeze_channel_mismatch(wrap):
  with pytest.raises(ValueError, match=r"channel counts.*reserved \(2, 5, 8\).*pruned \(2, 3, 6\)"):
    wrap(tps_jax.squeeze)(tokens(0, 2, 5, 8), tokens(1, 2, 3, 6))


@both
def test_squeeze_batch_mismatch(wrap):
  with pytest.raises(ValueError, match=r"batch sizes.*reserved \(2, 5, 8\).*pruned \(3, 3, 8\)"):
    wrap(tps_jax.squeeze)(tokens(0, 2, 5, 8), tokens(1, 3, 3, 8))


@both
def test_squeeze_wrong_rank(wrap):
  with pytest.raises(ValueError, match=r"pruned must have rank 3 \(B, Np, C\), got shape \(3, 8\)"):
    wrap(tps_jax.squeeze)(tokens(0, 2, 5, 8), tokens(1, 3, 8))
  with pytest.raises(ValueError, match=r"x must have rank 3"):
    wrap(tps_jax.squeeze_masked)(tokens(0, 5, 8), np.ones((5,)), np.zeros((5,)))


@both
def test_masked_mask_shape(wrap):
  with pytest.raises(ValueError, match=r"keep must have shape \(B, N\)=\(2, 5\).*got \(2, 4\)"):
    wrap(tps_jax.squeeze_masked)(tokens(0, 2, 5, 8), np.ones((2, 4)), np.zeros((2, 5)))
  with pytest.raises(ValueError, match=r"pruned must have shape.*got \(2, 5, 2\)"):
    wrap(tps_jax.squeeze_masked)(tokens(0, 2, 5, 8), np.ones((2, 5)), np.zeros((2, 5, 2)))


def test_masked_non_binary_masks():
  with pytest.raises(ValueError, match=r"keep must hold only 0 and 1.*0\.5"):
    tps_jax.squeeze_masked(tokens(0, 1, 4, 8), np.array([[1, 0.5, 0, 0]]), np.zeros((1, 4)))
  with pytest.raises(ValueError, match=r"pruned must hold only 0 and 1"):
    tps_jax.squeeze_masked(tokens(0, 1, 4, 8), np.ones((1, 4)), np.full((1, 4), 2.0))
  with pytest.raises(ValueError, match="overlap"):
    tps_jax.squeeze_masked(tokens(0, 1, 4, 8), np.ones((1, 4)), np.ones((1, 4)))
  with pytest.raises(ValueError, match=r"policy must hold only 0 and 1"):
    tps_jax.policy_softmax(tokens(0, 1, 1, 4, 4), np.full((1, 4), 0.3))


def test_temperature_must_be_positive():
  for t in (0.0, -1.0):
    with pytest.raises(ValueError, match="temperature must be > 0"):
      tps_jax.squeeze(tokens(0, 1, 3, 4), tokens(1, 1, 2, 4), temperature=t)
    with pytest.raises(ValueError, match="temperature must be > 0"):
      tps_jax.gumbel_softmax_hard(tokens(0, 2, 2), temperature=t)


@both
@pytest.mark.parametrize("k", [-1, 13])
def test_topk_out_of_range(wrap, k):
  with pytest.raises(ValueError, match=rf"k={k} is out of range \[0, 12\].*\(3, 12\)"):
    wrap(lambda s: tps_jax.topk_split(s, k))(tokens(0, 3, 12))


def test_topk_count_must_be_static():
  with pytest.raises(ValueError, match="k must be a Python int"):
    tps_jax.topk_split(tokens(0, 3, 12), 2.5)
  with pytest.raises(ValueError, match="k must be a Python int"):
    jax.jit(tps_jax.topk_split)(tokens(0, 3, 12), 2)
  with pytest.raises(ValueError, match=r"scores must have rank 2"):
    tps_jax.topk_split(tokens(0, 3, 12, 1), 2)


@both
def test_gather_errors(wrap):
  with pytest.raises(ValueError, match=r"batch sizes.*x \(2, 5\).*idx \(3, 2\)"):
    wrap(tps_jax.gather_tokens)(tokens(0, 2, 5, 4), np.zeros((3, 2), np.int32))
  with pytest.raises(ValueError, match="idx must be integer"):
    wrap(tps_jax.gather_tokens)(tokens(0, 2, 5, 4), np.zeros((2, 2), np.float32))


@both
def test_attention_shapes(wrap):
  with pytest.raises(ValueError, match=r"logits must have rank 4 \(B, H, N, N\)"):
    wrap(tps_jax.policy_softmax)(tokens(0, 2, 5, 5), np.ones((2, 5)))
  with pytest.raises(ValueError, match=r"policy must have shape \(B, N\)=\(2, 5\)"):
    wrap(tps_jax.policy_softmax)(tokens(0, 2, 1, 5, 5), np.ones((2, 4)))
  with pytest.raises(ValueError, match="square"):
    wrap(tps_jax.class_attention_scores)(tokens(0, 2, 1, 5, 4))


@both
def test_evit_shapes(wrap):
  with pytest.raises(ValueError, match=r"pruned \(2, 5, 3\).*pruned_attn \(2, 4\)"):
    wrap(tps_jax.evit_fuse)(tokens(0, 2, 5, 3), tokens(1, 2, 4))


def test_tome_errors():
  with pytest.raises(ValueError, match=r"r=-1 is out of range"):
    tps_jax.bipartite_soft_matching(tokens(0, 1, 9, 4), -1)
  x = tokens(0, 1, 9, 4)
  match = tps_jax.bipartite_soft_matching(x, 2)
  with pytest.raises(ValueError, match="different token count"):
    tps_jax.merge_sum(tokens(1, 1, 13, 4), match)
  with pytest.raises(ValueError, match=r"size must have shape \(B, N\)=\(1, 9\)"):
    tps_jax.merge_wavg(x, np.ones((1, 8)), match)
