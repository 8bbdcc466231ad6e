"""ToFu against OpenToMe's implementation (the authors published none): its MLERP and prune
merges on seeded tokens, and its patched timm DeiT end to end (tests/goldens/tofu/, written by
scripts/tofu_goldens.py, provenance in its docstring); then what is ToFu's own."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import opentome_deit
from tps_jax import ops
from tps_jax.methods import tofu
from tps_jax.models.vit import Model

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens" / "tofu"
OPS = dict(np.load(GOLDENS / "ops.npz"))
CASES = sorted(k.split(":", 1)[1] for k in OPS if k.startswith("x:"))


@pytest.mark.parametrize("case", CASES)
def test_merges_equal_opentome(case):
  metric, x = jnp.asarray(OPS[f"metric:{case}"]), jnp.asarray(OPS[f"x:{case}"])
  match = ops.bipartite_soft_matching(metric, int(OPS[f"r:{case}"]),
                                      class_token=bool(OPS[f"cls:{case}"]))
  stay = match.unmerged.shape[1]

  def same(ours, theirs, **tol):
    ours = np.asarray(ours)
    if not OPS[f"cls:{case}"]:  # without cls OpenToMe leaves the unmerged A tokens in match
      # order, ours ascending: the same tokens (attention and pooling do not see the order)
      rows = lambda a: np.take_along_axis(a[:, :stay], np.argsort(a[:, :stay, 0], 1)[..., None], 1)
      ours, theirs = (np.concatenate([rows(a), a[:, stay:]], 1) for a in (ours, theirs))
    np.testing.assert_allclose(ours, theirs, **tol)

  same(tofu.mlerp_merge(x, match), OPS[f"tofu:{case}"], rtol=1e-5, atol=1e-6)
  same(tofu.prune_matched(x, match), OPS[f"prune:{case}"], rtol=0, atol=0)


@pytest.mark.parametrize("r", [0, 2, 4, 6])
def test_model_equals_opentome_patched_timm_deit(r):
  assert Model(5, width=48, depth=6, num_heads=3, mlp_dim=192, patch_size=8, image_size=64,
               reduction={"method": "tofu", "r": r}).reduction.options.prune_blocks == 4
  # (blocks 0..depth // 2 prune, as theirs)
  logits, out, theirs, theirs_dense = opentome_deit("tofu", r)
  np.testing.assert_allclose(logits, theirs, rtol=1e-5, atol=2e-5)
  assert out["encoded"].shape[1] == 65 - 6 * r
  assert "token_sizes" in out  # merged tokens: token distillation has no teacher token for them
  if r:
    assert not np.allclose(theirs, theirs_dense, atol=1e-3)  # it merged


def test_mlerp_keeps_the_largest_norm_and_prune_follows_each_patch():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 17, 8)) * rng.uniform(0.5, 3, (2, 17, 1)), jnp.float32)
  match = ops.bipartite_soft_matching(x, 5, class_token=True)
  fused = tofu.mlerp_merge(x, match, norm_of="average")
  b_norm = np.linalg.norm(np.asarray(x[:, 1::2]), axis=-1)
  src_norm = np.linalg.norm(np.take_along_axis(np.asarray(x[:, ::2]),
                                               np.asarray(match.src)[..., None], 1), axis=-1)
  largest = b_norm.copy()
  for bi in range(2):
    for s, d in zip(src_norm[bi], np.asarray(match.dst[bi])):
      largest[bi, d] = max(largest[bi, d], s)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(fused[:, -8:]), axis=-1), largest,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="unknown tofu norm_of 'max'"):
    Model(5, width=48, depth=4, num_heads=3, patch_size=8, image_size=32,
          reduction={"method": "tofu", "r": 2, "norm_of": "max"})
  # 2-D outputs: a patch pruned in the early blocks has no token (-1), a fused one has its host.
  model = Model(5, width=48, depth=4, num_heads=3, patch_size=8, image_size=32, pool_type="gap",
                layout="big_vision", outputs_2d=True, reduction={"method": "tofu", "r": 2})
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.key(0), images)
  _, out = jax.jit(model.apply)(params, images)
  owner = np.asarray(out["patch_token"])
  assert ((owner == -1).sum(1) == 2 * 3).all()  # r = 2 pruned in each of blocks 0-2
  assert (owner < out["encoded"].shape[1]).all()
  np.testing.assert_allclose(np.asarray(out["sizes"]).sum(-1), 16 - 6)  # the fused ones count
