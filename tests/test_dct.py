"""DCT token reduction against OpenToMe's implementation: its operator on seeded tokens and its
patched timm DeiT end to end (tests/goldens/dct/, written by scripts/dct_goldens.py, provenance
in its docstring); then the transform's own properties."""

import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import opentome_deit
from tps_jax.methods import dct

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens" / "dct"
OPS = dict(np.load(GOLDENS / "ops.npz"))
CASES = sorted(k.split(":", 1)[1] for k in OPS if k.startswith("x:"))


@pytest.mark.parametrize("case", CASES)
def test_reduction_equals_opentome(case):
  ours = dct.dct_reduce(jnp.asarray(OPS[f"x:{case}"]), int(OPS[f"r:{case}"]),
                        prefix=int(OPS[f"cls:{case}"]))
  np.testing.assert_allclose(ours, OPS[f"dct:{case}"], rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("r", [0, 2, 4, 6])
def test_model_equals_opentome_patched_timm_deit(r):
  logits, out, theirs, theirs_dense = opentome_deit("dct", r)
  np.testing.assert_allclose(logits, theirs, rtol=1e-5, atol=2e-5)
  assert out["encoded"].shape[1] == 65 - 6 * r
  if r:
    assert not np.allclose(theirs, theirs_dense, atol=1e-3)  # it reduced


def test_lowpass_keeps_smooth_signals_and_is_orthonormal_at_full_length():
  c = dct.dct_matrix(12)
  np.testing.assert_allclose(c @ c.T, np.eye(12), atol=1e-12)
  np.testing.assert_allclose(dct.lowpass(12, 12), np.eye(12), atol=1e-6)  # r = 0: identity
  # A constant sequence stays constant, rescaled by sqrt(t / keep) (orthonormal both ways).
  np.testing.assert_allclose(dct.lowpass(12, 8) @ np.ones(12), np.sqrt(12 / 8) * np.ones(8),
                             rtol=1e-6)
  np.testing.assert_array_equal(dct.resampled_index(6, 4), [0, 1, 1, 2, 3, 3])
  np.testing.assert_array_equal(np.bincount(dct.resampled_index(65, 33)).sum(), 65)
