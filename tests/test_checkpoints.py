"""Checkpoint import: file formats, big_vision .npz, errors that name the keys, fresh parts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax import checkpoints
from tps_jax.models.vit import Model
from conftest import golden, jit_apply


@pytest.fixture(scope="module")
def golden_sd():
  g = golden("model_small")
  return g, {k[2:]: g[k] for k in g if k.startswith("w/")}


def _model(method="dtps", **kw):
  return Model(10, width=96, depth=6, num_heads=3, patch_size=8, image_size=64,
               reduction=None if method == "none" else
               dict(method=method, locations=(1, 3, 4), keep_ratio=0.6), **kw)


def _x(g):
  return jnp.asarray(g["images_nchw"].transpose(0, 2, 3, 1))


def test_npz_file_and_nested_model_key(golden_sd, tmp_path):
  g, sd = golden_sd
  path = tmp_path / "tps.npz"
  np.savez(path, **sd)
  params = checkpoints.from_torch_state_dict(str(path), _model())
  logits, _ = jax.jit(_model().apply)({"params": params}, _x(g))
  np.testing.assert_allclose(logits, g["logits_eval"], atol=1e-4)
  nested = checkpoints.from_torch_state_dict({"model": {"module." + k: v for k, v in sd.items()}},
                                             _model())
  np.testing.assert_array_equal(nested["cls"], params["cls"])


def test_safetensors_file(golden_sd, tmp_path):
  from safetensors.numpy import save_file
  g, sd = golden_sd
  path = tmp_path / "tps.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path))
  params = checkpoints.from_torch_state_dict(path, _model())
  np.testing.assert_array_equal(params["Transformer"]["score_head_1"]["Dense_3"]["kernel"],
                                sd["score_predictor.1.out_conv.4.weight"].T)
  np.testing.assert_array_equal(params["embedding"]["kernel"],
                                sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))


def test_missing_unexpected_and_mismatched_keys_are_named(golden_sd):
  _, sd = golden_sd
  broken = dict(sd)
  del broken["blocks.2.mlp.fc1.weight"]
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="missing.*encoderblock_2/MlpBlock_0/Dense_0/kernel"):
    checkpoints.from_torch_state_dict(broken, _model())
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"unexpected keys.*dist_token"):
    checkpoints.from_torch_state_dict({**sd, "dist_token": np.zeros((1, 1, 96))}, _model())
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r"head/kernel: checkpoint \(96, 10\) vs model \(96, 7\)"):
    checkpoints.from_torch_state_dict(sd, Model(7, width=96, depth=6, num_heads=3, patch_size=8,
                                                image_size=64, reduction=_model().reduction))
  odd = {**sd, "pos_embed": np.asarray(sd["pos_embed"])[:, :63]}  # no square grid
  with pytest.raises(checkpoints.CheckpointMismatchError, match="63 positions.*16 patches"):
    checkpoints.from_torch_state_dict(odd, Model(10, width=96, depth=6, num_heads=3,
                                                 patch_size=8, image_size=32))


def test_fresh_head_and_dense_checkpoint_into_tps_model(golden_sd):
  _, sd = golden_sd
  dense_sd = {k: v for k, v in sd.items() if not k.startswith("score_predictor")}
  with pytest.raises(checkpoints.CheckpointMismatchError, match="score_head_0.*fresh="):
    checkpoints.from_torch_state_dict(dense_sd, _model())
  params = checkpoints.from_torch_state_dict(dense_sd, _model(), fresh=("score_heads",))
  assert "score_head_2" in params["Transformer"]
  np.testing.assert_array_equal(params["cls"], sd["cls_token"])
  params = checkpoints.from_torch_state_dict(sd, Model(
      7, width=96, depth=6, num_heads=3, patch_size=8, image_size=64,
      reduction=_model().reduction), fresh=("head",), rng=jax.random.key(3))
  assert params["head"]["kernel"].shape == (96, 7)
  with pytest.raises(ValueError, match="unknown fresh groups"):
    checkpoints.from_torch_state_dict(sd, _model(), fresh=("backbone",))


def test_missing_file_and_unknown_format(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoints.from_torch_state_dict(str(tmp_path / "nope.npz"), _model())
  (tmp_path / "w.ckpt").write_bytes(b"x")
  with pytest.raises(ValueError, match="unknown checkpoint format '.ckpt'"):
    checkpoints.from_torch_state_dict(str(tmp_path / "w.ckpt"), _model())


def test_pth_without_torch_says_so(tmp_path, monkeypatch):
  import builtins
  real_import = builtins.__import__

  def no_torch(name, *a, **k):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *a, **k)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  (tmp_path / "w.pth").write_bytes(b"PK\x03\x04" + b"\x00" * 60)  # a zip, as torch.save
  with pytest.raises(ImportError, match="needs PyTorch"):
    checkpoints.from_torch_state_dict(str(tmp_path / "w.pth"), _model())


def _valid(fmt, path):
  """A small valid checkpoint file of `fmt` at `path`."""
  arrays = {"a": np.arange(64, dtype=np.float32).reshape(8, 8), "b": np.ones(300, np.float32)}
  if fmt == "npz":
    np.savez(path, **arrays)
  elif fmt == "safetensors":
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(arrays, str(path))
  else:
    torch = pytest.importorskip("torch")
    torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, str(path))
  return path


DAMAGE = {
    "empty": (lambda good: b"", r"is empty \(0 bytes\)"),
    "truncated": (lambda good: good[:len(good) // 2], r"truncated"),
    "foreign": (lambda good: b"<html>not a checkpoint</html>\n" * 20, r"is not|not a readable"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pth"])
def test_a_damaged_file_is_one_line_that_names_it(fmt, damage, tmp_path):
  """Empty, truncated or foreign bytes: a CheckpointCorruptError naming the file and the damage,
  in one line, never with advice to unpickle it."""
  good = _valid(fmt, tmp_path / f"good.{fmt}").read_bytes()
  make, match = DAMAGE[damage]
  bad = tmp_path / f"{damage}.{fmt}"
  bad.write_bytes(make(good))
  if fmt == "pth" and damage == "truncated":
    pytest.importorskip("torch")  # what torch.load answers is read only where torch is
  with pytest.raises(checkpoints.CheckpointCorruptError, match=match) as e:
    checkpoints.load_state_dict(bad)
  text = str(e.value)
  assert str(bad) in text and "\n" not in text and "pickle=" not in text
  assert "weights_only" not in text and "trusted" not in text, text


class Opaque:  # an object a weights-only load refuses
  pass


def test_pickled_objects_are_refused_not_unpickled(tmp_path):
  """An .npz of Python objects (numpy would suggest allow_pickle) and a .pth holding more than
  tensors (torch would suggest weights_only=False): named, refused, no advice to unpickle."""
  path = tmp_path / "objects.npz"
  np.savez(path, params=np.array([{"w": 1}, None], dtype=object))
  with pytest.raises(checkpoints.CheckpointCorruptError,
                     match=r"objects.npz holds 'params' as pickled Python objects") as e:
    checkpoints.load_state_dict(path)
  assert "allow_pickle" not in str(e.value)
  np.savez(tmp_path / "none.npz")
  with pytest.raises(checkpoints.CheckpointCorruptError, match="none.npz holds no arrays"):
    checkpoints.load_state_dict(tmp_path / "none.npz")
  torch = pytest.importorskip("torch")
  torch.save({"w": torch.ones(2), "opt": Opaque()}, str(tmp_path / "obj.pth"))
  with pytest.raises(checkpoints.CheckpointCorruptError,
                     match="obj.pth holds Python objects besides tensors") as e:
    checkpoints.load_state_dict(tmp_path / "obj.pth")
  assert "weights_only" not in str(e.value) and "trusted" not in str(e.value)


def test_big_vision_npz_with_augreg_names(golden_sd, tmp_path):
  """Write our params under the AugReg (vision_transformer) names, read them back."""
  g, sd = golden_sd
  dense = _model("none", layout="big_vision", gelu="exact")  # timm weights: PyTorch's GELU
  params = checkpoints.from_torch_state_dict(
      {k: v for k, v in sd.items() if not k.startswith("score_predictor")}, dense)
  flat = checkpoints.to_flat(params)
  renamed = {}
  for k, v in flat.items():
    k = k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
    k = k.replace("/LayerNorm_1/", "/LayerNorm_2/").replace("MlpBlock_0", "MlpBlock_3")
    k = "Transformer/posembed_input/pos_embedding" if k == "pos_embedding" else k
    renamed[k] = v
  path = tmp_path / "augreg.npz"
  np.savez(path, **renamed)
  loaded = checkpoints.from_big_vision(str(path), dense)
  ref, _ = jit_apply(dense, {"params": params}, _x(g))
  out, _ = jit_apply(dense, {"params": loaded}, _x(g))
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # And into the DeiT layout, and into a dTPS model with fresh score heads.
  deit = _model("dtps")
  tps_params = checkpoints.from_big_vision(str(path), deit, fresh=("score_heads",))
  assert tps_params["pos_embedding"].shape == (1, 65, 96)
  dense_deit = _model("none")
  out, _ = jit_apply(dense_deit,
                     {"params": checkpoints.from_big_vision(str(path), dense_deit)}, _x(g))
  np.testing.assert_allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_orbax_step_is_named(damage, tmp_path):
  """Our runs' Orbax steps: a data file emptied or cut short is named with its step (the
  checksums catch it); without checksums, damaged metadata is named too."""
  from tps_jax.checkpoints import runs  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import state as state_lib  # pylint: disable=g-import-not-at-top
  ckpt = state_lib.Checkpoints(tmp_path, keep=2)
  ckpt.save(1, {"step": jnp.asarray(1, jnp.int32), "params": {"w": jnp.ones((64, 64))}},
            wait=True)
  ckpt.close()
  step = tmp_path / "checkpoints" / "1"
  files = sorted((p for p in step.rglob("*") if p.is_file() and p.name != runs.CHECKSUMS),
                 key=lambda p: p.stat().st_size)
  biggest = files[-1]
  data = biggest.read_bytes()
  biggest.write_bytes(b"" if damage == "empty" else data[:len(data) // 2])
  with pytest.raises(checkpoints.CheckpointCorruptError, match=r"checkpoints/1.*checksums"):
    runs.read_params(step)
  (step / runs.CHECKSUMS).unlink()
  (step / runs.ITEM / "_METADATA").write_bytes(b"" if damage == "empty" else b'{"tree_met')
  with pytest.raises(checkpoints.CheckpointCorruptError,
                     match=r"checkpoints/1 is corrupt: its metadata cannot be read") as e:
    runs.read_params(step)
  assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["linear", "bicubic"])
def test_a_resampled_patch_kernel_gives_each_upsampled_patch_its_token(method):
  """FlexiViT's pseudo-inverse resize: a patch upsampled to the new patch size, embedded with
  the resampled kernel, gives the old patch's token (exactly, as the resize is injective)."""
  from tps_jax.checkpoints.patch_kernel import resample_patch_kernel, resize_matrix
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 4, 3, 5)).astype(np.float32)
  new = resample_patch_kernel(kernel, (6, 6), method=method)
  patches = rng.normal(size=(7, 4, 4, 3)).astype(np.float32)
  up = jax.image.resize(patches, (7, 6, 6, 3), "linear" if method == "linear" else "cubic")
  np.testing.assert_allclose(np.einsum("nhwc,hwcd->nd", up, new),
                             np.einsum("nhwc,hwcd->nd", patches, kernel), rtol=1e-4, atol=1e-4)
  assert resample_patch_kernel(kernel, (4, 4)) is kernel
  with pytest.raises(ValueError, match="unknown resampling 'nearest'"):
    resize_matrix((4, 4), (6, 6), "nearest")


def test_a_big_vision_npz_of_another_patch_size_loads_its_kernel_resampled(tmp_path):
  """A patch-8 checkpoint into a patch-16 model on the same grid: the kernel is resampled
  (bilinear, as big_vision's FlexiViT), everything else loads as it is."""
  from tps_jax.checkpoints.patch_kernel import resample_patch_kernel
  small = Model(10, width=32, depth=1, num_heads=2, patch_size=8, image_size=32,
                layout="big_vision", pool_type="gap")
  params = jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  path = tmp_path / "p8.npz"
  np.savez(path, **checkpoints.to_flat(params))
  big = Model(10, width=32, depth=1, num_heads=2, patch_size=16, image_size=64,
              layout="big_vision", pool_type="gap")
  loaded = checkpoints.from_big_vision(str(path), big)
  np.testing.assert_allclose(loaded["embedding"]["kernel"], resample_patch_kernel(
      np.asarray(params["embedding"]["kernel"]), (16, 16), method="linear"), rtol=1e-6)
  np.testing.assert_array_equal(loaded["pos_embedding"], params["pos_embedding"])
