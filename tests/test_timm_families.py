"""The ViTs people reduce, against timm's (and OpenCLIP's) own forward.

tests/goldens/timm/ (scripts/timm_goldens.py) holds, per family, timm's model built by its real
name at small sizes with seeded weights, its state dict, inputs, logits and tokens. Each loads
through `checkpoints.from_torch_state_dict` into the `Model` that `timm_names.model_kwargs`
builds from the name, equals timm's forward (relative error <= 1e-4, float32), and reduces with
every registered method on each token layout among them, whose keep-1.0 spec equals dense.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONTRACT_METHODS, ROOT
from tps_jax import checkpoints, methods
from tps_jax.models import timm_names
from tps_jax.models.vit import Model

GOLDENS = ROOT / "tests" / "goldens" / "timm"
FAMILIES = ("deit3", "dinov2", "dinov2_reg4", "dinov2_giant", "clip_openai", "clip_laion", "mae",
            "siglip", "siglip_gap")
REDUCING = tuple(n for n in CONTRACT_METHODS if methods.get(n).reduces)


def _golden(family):
  with np.load(GOLDENS / f"{family}.npz") as z:
    g = {k: z[k] for k in z.files}
  sd = {k[3:]: v for k, v in g.items() if k.startswith("sd:")}
  return g, sd, json.loads(str(g["kwargs"]))


def _model(name, kwargs, sd, reduction=None):
  """Our model for timm's `name` at the golden's sizes (the MLP's width as its state dict's)."""
  kw = timm_names.model_kwargs(name, global_pool=kwargs.get("global_pool"),
                               image_size=kwargs["img_size"], width=kwargs["embed_dim"],
                               depth=kwargs["depth"], num_heads=kwargs["num_heads"],
                               mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0],
                               patch_size=kwargs.get("patch_size"), reduction=reduction)
  return Model(kwargs["num_classes"], **{k: v for k, v in kw.items() if v is not None})


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _apply(model, params, images):
  return jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)


def _nhwc(images):
  return jnp.asarray(np.transpose(images, (0, 2, 3, 1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_and_equals_timm(family):
  g, sd, kwargs = _golden(family)
  model = _model(str(g["name"]), kwargs, sd)
  params = checkpoints.from_torch_state_dict(sd, model)
  logits, out = _apply(model, params, _nhwc(g["images"]))
  assert _rel(logits, g["logits"]) <= 1e-4, _rel(logits, g["logits"])
  # timm's tokens: cls, registers, patches, after the final norm (before it with fc_norm)
  assert _rel(out["encoded"], g["features"]) <= 1e-4


def test_a_checkpoint_on_another_grid_resamples_as_timm():
  """DINOv2's table for 5 x 5 patches into a 4 x 4 model: bicubic, antialiased, as timm's
  loader (checkpoint_filter_fn) resamples it."""
  g, sd, kwargs = _golden("dinov2_resampled")
  assert sd["pos_embed"].shape[1] == 1 + 25
  model = _model(str(g["name"]), kwargs, sd)
  logits, _ = _apply(model, checkpoints.from_torch_state_dict(sd, model), _nhwc(g["images"]))
  assert _rel(logits, g["logits"]) <= 1e-4, _rel(logits, g["logits"])


def test_a_checkpoint_of_another_patch_size_resamples_its_kernel_as_timm():
  """DINOv2's patch-14 kernel into a patch-16 model (64 px, the same 4 x 4 grid): FlexiViT's
  pseudo-inverse resize, bicubic and antialiased, as timm's loader (checkpoint_filter_fn)."""
  g, sd, kwargs = _golden("dinov2_patch16")
  assert sd["patch_embed.proj.weight"].shape[-2:] == (14, 14) and kwargs["patch_size"] == 16
  model = _model(str(g["name"]), kwargs, sd)
  logits, _ = _apply(model, checkpoints.from_torch_state_dict(sd, model), _nhwc(g["images"]))
  assert _rel(logits, g["logits"]) <= 1e-4, _rel(logits, g["logits"])


def test_an_openclip_state_dict_loads_and_equals_openclip():
  """OpenCLIP's own tower (OpenAI's layout: no patch bias, ln_pre, quick GELU, a projection
  `visual.proj`), its text-side keys left out."""
  g, sd, _ = _golden("openclip")
  assert "logit_scale" in sd and "visual.proj" in sd
  model = Model(16, **timm_names.model_kwargs(
      "vit_base_patch16_clip_quickgelu_224", image_size=64, width=32, depth=2, num_heads=2,
      mlp_dim=128))
  logits, _ = _apply(model, checkpoints.from_torch_state_dict(sd, model), _nhwc(g["images"]))
  assert _rel(logits, g["logits"]) <= 1e-4, _rel(logits, g["logits"])


def test_a_missing_or_misshapen_tensor_is_named():
  g, sd, kwargs = _golden("dinov2_reg4")
  model = _model(str(g["name"]), kwargs, sd)
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="missing.*encoderblock_1/LayerScale_1/scale"):
    checkpoints.from_torch_state_dict({k: v for k, v in sd.items()
                                       if k != "blocks.1.ls2.gamma"}, model)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"registers: checkpoint"):
    checkpoints.from_torch_state_dict({**sd, "reg_token": sd["reg_token"][:, :3]}, model)
  no_registers = Model(10, **timm_names.model_kwargs(  # the name without "reg4"
      "vit_small_patch14_dinov2", image_size=56, width=32, depth=2, num_heads=2, mlp_dim=128,
      layout="big_vision"))
  with pytest.raises(checkpoints.CheckpointMismatchError, match="not in the model.*registers"):
    checkpoints.from_torch_state_dict(sd, no_registers)


def _with_new_parts(model, params):
  """The loaded parameters plus seeded ones for what a method adds (score heads)."""
  images = jnp.zeros((1,) + tuple(np.broadcast_to(model.image_size, 2)) + (3,))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), images)["params"])
  extra = {k: v for k, v in shapes["Transformer"].items() if k not in params["Transformer"]}
  rng = np.random.default_rng(3)
  extra = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), extra)
  return {**params, "Transformer": {**params["Transformer"], **extra}}


# The token layouts the families add: what a method sees. Layer scale, norm_pre and the GELU
# live inside the blocks, which a method calls whole; cls with or without a position (DeiT III,
# DINOv2, CLIP) and MAP without cls (SigLIP) are the contract suite's "tok" and "map" layouts
# (test_methods.py), run there with every method.
LAYOUTS = ("dinov2_reg4", "mae")  # cls + registers; cls pooled out


@pytest.mark.parametrize("family", LAYOUTS)
def test_every_method_reduces_it_and_keeps_it_whole_at_keep_one(family):
  g, sd, kwargs = _golden(family)
  dense = _model(str(g["name"]), kwargs, sd)
  params = checkpoints.from_torch_state_dict(sd, dense)
  images = _nhwc(g["images"])
  dense_logits, dense_out = _apply(dense, params, images)
  geo = dense.plan().geometry
  for name in REDUCING:
    method = methods.get(name)
    for kind in ("identity", "example"):
      model = _model(str(g["name"]), kwargs, sd, reduction=getattr(method, kind)(geo))
      logits, out = _apply(model, _with_new_parts(model, params), images)
      if kind == "identity":
        np.testing.assert_allclose(logits, dense_logits, rtol=1e-4, atol=1e-5,
                                   err_msg=f"{name} at keep 1.0 on {family}")
      else:
        assert np.isfinite(np.asarray(logits)).all(), (name, family)
        assert out["encoded"].shape[1] < dense_out["encoded"].shape[1], (name, family)


def test_the_settings_read_from_timm_names_and_the_unknown_ones_named():
  kw = timm_names.model_kwargs
  assert kw("vit_base_patch14_reg4_dinov2.lvd142m") == dict(
      variant="B/14", layout="big_vision", gelu="exact", pool_type="tok", layer_norm_eps=1e-6,
      image_size=518, layer_scale=1e-5, num_registers=4)
  assert kw("vit_large_patch14_clip_quickgelu_336")["gelu"] == "quick"
  assert kw("vit_so400m_patch14_siglip_384")["gelu"] == "exact"  # as timm builds each
  assert kw("vit_so400m_patch16_siglip_256")["gelu"] == "tanh"
  gap = kw("vit_base_patch32_siglip_gap_256")
  assert (gap["pool_type"], gap["gelu"], gap.get("fc_norm")) == ("gap", "tanh", None)
  mae = kw("vit_large_patch16_224.mae", global_pool="avg")
  assert (mae["pool_type"], mae["class_token"], mae["fc_norm"]) == ("gap", True, True)
  assert kw("deit3_base_patch16_384", image_size=224)["image_size"] == 224
  giant = kw("vit_giant_patch14_reg4_dinov2.lvd142m")
  assert (giant["variant"], giant["num_heads"], giant["mlp_dim"], giant["mlp"]) == (
      "g-opt/14", 24, 8192, "swiglu")
  assert kw("vit_giant_patch14_clip_224")["variant"] == "g/14"  # 1408 wide, GELU MLP
  with pytest.raises(ValueError, match="unknown timm ViT name 'vit_gigantic_patch14_clip_224'"):
    kw("vit_gigantic_patch14_clip_224")
  with pytest.raises(ValueError, match="unknown timm ViT family 'sam'"):
    kw("vit_base_patch16_sam_224")
  with pytest.raises(ValueError, match="expected 'avg' or its own pooling, 'map'"):
    kw("vit_base_patch16_siglip_224", global_pool="token")
