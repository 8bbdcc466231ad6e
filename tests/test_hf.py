"""The ViTs people load from Hugging Face, against transformers' own forward.

tests/goldens/hf/ (scripts/hf_goldens.py) holds, per family, transformers' model built from its
config class at small sizes with seeded weights: its config, its state dict in transformers 5's
names and as `save_pretrained` writes it to the Hub, inputs, outputs and tokens. Each loads
through `checkpoints.load_params` / `from_torch_state_dict` into the `Model` that
`hf_config.model_kwargs` builds from the config, and equals transformers' forward (relative
error <= 1e-4, float32); the DINOv2 families run at a grid other than their table's, which
transformers interpolates (plainly for DINOv2, antialiased with registers).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT
from tps_jax import checkpoints
from tps_jax.checkpoints import hf
from tps_jax.models import hf_config
from tps_jax.models.vit import Model

GOLDENS = ROOT / "tests" / "goldens" / "hf"
FAMILIES = {"clip": 16, "siglip": 0, "dinov2": 0, "dinov2_reg": 0, "dinov2_swiglu": 0,
            "vit": 10}  # family -> the model's outputs (0: the pooled vector)


def _golden(family):
  with np.load(GOLDENS / f"{family}.npz") as z:
    g = {k: z[k] for k in z.files}
  part = lambda tag: {k[len(tag):]: v for k, v in g.items() if k.startswith(tag)}
  return g, part("sd:"), part("hub:"), json.loads(str(g["config"]))


def _model(family, config, images, **kw):
  return Model(FAMILIES[family], **hf_config.model_kwargs(config, image_size=images.shape[-1],
                                                          **kw))


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def _check(family, model, params, g):
  images = jnp.asarray(np.transpose(g["images"], (0, 2, 3, 1)))
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, images)
  output = logits if FAMILIES[family] else out["pre_logits"]
  assert _rel(output, g["output"]) <= 1e-4, (family, _rel(output, g["output"]))
  assert _rel(out["encoded"], g["features"]) <= 1e-4, family


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_and_equals_transformers(family):
  g, sd, hub, config = _golden(family)
  model = _model(family, config, g["images"])
  _check(family, model, checkpoints.from_torch_state_dict(sd, model), g)
  if hub:  # the Hub's names (DINOv2's packed SwiGLU, ViT's intermediate / output) load alike
    _check(family, model, checkpoints.from_torch_state_dict(hub, model), g)


def test_a_hub_safetensors_file_loads_through_load_params(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  g, _, hub, config = _golden("dinov2_reg")
  (tmp_path / "config.json").write_text(json.dumps(config))
  save_file(hub, str(tmp_path / "model.safetensors"))
  model = Model(0, **hf_config.model_kwargs(tmp_path, image_size=56))
  _check("dinov2_reg", model, checkpoints.load_params(tmp_path / "model.safetensors", model), g)


def test_the_settings_read_from_configs_and_the_unknown_ones_named(tmp_path):
  kw = hf_config.model_kwargs
  clip = kw({"model_type": "clip", "vision_config": {
      "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
      "intermediate_size": 4096, "patch_size": 14, "image_size": 336, "hidden_act": "quick_gelu"}})
  assert (clip["gelu"], clip["norm_pre"], clip["layer_norm_eps"], clip["image_size"]) == (
      "quick", True, 1e-5, 336)
  siglip = kw({"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh",
               "layer_norm_eps": 1e-6, "vision_use_head": False})
  assert (siglip["gelu"], siglip["pool_type"], siglip["layout"]) == ("tanh", "none", "big_vision")
  giant = kw({"model_type": "dinov2", "hidden_size": 1536, "num_hidden_layers": 40,
              "num_attention_heads": 24, "mlp_ratio": 4, "use_swiglu_ffn": True,
              "layerscale_value": 1.0, "layer_norm_eps": 1e-6})
  assert (giant["mlp"], giant["mlp_dim"]) == ("swiglu", 8192)  # timm's vit_giant_patch14_dinov2
  with pytest.raises(ValueError, match="unknown transformers model_type 'swin'"):
    kw({"model_type": "swin"})
  with pytest.raises(ValueError, match="unknown hidden_act 'relu'"):
    kw({"model_type": "vit", "hidden_act": "relu"})
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    kw(tmp_path)
  # What a saved config leaves out is the config class's default: a two-tower model's short
  # vision_config (CLIP: patch 32, quick GELU, eps 1e-5; SigLIP: the tanh GELU, eps 1e-6).
  short = kw({"model_type": "clip", "vision_config": {"hidden_size": 1024}})
  assert (short["patch_size"], short["gelu"], short["layer_norm_eps"], short["width"]) == (
      32, "quick", 1e-5, 1024)
  short = kw({"model_type": "siglip", "vision_config": {"patch_size": 14}})
  assert (short["gelu"], short["layer_norm_eps"], short["pool_type"]) == ("tanh", 1e-6, "map")
  assert kw({"model_type": "dinov2_with_registers"})["num_registers"] == 4


def test_what_does_not_fit_is_named():
  g, sd, _, config = _golden("dinov2")
  model = _model("dinov2", config, g["images"])
  with pytest.raises(checkpoints.CheckpointMismatchError, match="block 1's attention weight lacks"):
    checkpoints.from_torch_state_dict(
        {k: v for k, v in sd.items() if k != "encoder.layer.1.attention.k_proj.weight"}, model)
  classifier = {"classifier.weight": np.zeros((10, 64), np.float32),
                "classifier.bias": np.zeros(10, np.float32)}
  with pytest.raises(checkpoints.CheckpointMismatchError, match="Dinov2 / CLIP / Siglip ForImage"):
    checkpoints.from_torch_state_dict({**sd, **classifier}, model)
  fresh = checkpoints.from_torch_state_dict({**sd, **classifier}, _model(
      "dinov2", config, g["images"]).clone(num_classes=10), fresh=("head",))
  assert fresh["head"]["kernel"].shape == (32, 10)
  _, clip, _, _ = _golden("clip")  # CLIPForImageClassification: the mean before the norm
  with pytest.raises(checkpoints.CheckpointMismatchError, match="ForImageClassification head"):
    checkpoints.from_torch_state_dict({**clip, **classifier}, model)
  g, sd, _, config = _golden("vit")
  pooler = {"vit.pooler.dense.weight": np.eye(32, dtype=np.float32),
            "vit.pooler.dense.bias": np.zeros(32, np.float32)}
  with pytest.raises(checkpoints.CheckpointMismatchError, match="build the model with rep_size"):
    checkpoints.from_torch_state_dict({**sd, **pooler}, _model("vit", config, g["images"]))
  with_pooler = _model("vit", config, g["images"], rep_size=True)
  params = checkpoints.from_torch_state_dict({**sd, **pooler}, with_pooler)
  np.testing.assert_array_equal(params["pre_logits"]["kernel"], np.eye(32))
  assert hf.is_transformers(sd) and not hf.is_transformers({"patch_embed.proj.weight": 0})


def _hub_dir(path, config, sd):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
  return path


def test_hub_directories_of_timm_and_transformers_models_load_whole(tmp_path):
  """`from_pretrained`: the model from config.json (timm's `architecture` or transformers'
  `model_type`), its classes from the checkpoint's head, the weights from the directory."""
  g, _, hub, config = _golden("vit")  # ViTForImageClassification: 10 classes
  model, params = checkpoints.from_pretrained(_hub_dir(tmp_path / "vit", config, hub))
  assert model.num_classes == 10 and model.layer_norm_eps == 1e-12
  _check("vit", model, params, g)
  _check("vit", model, checkpoints.load_params(tmp_path / "vit", model), g)  # the same dir
  g, sd, _, config = _golden("siglip")  # no head: the pooled vector, 0 classes
  model, params = checkpoints.from_pretrained(_hub_dir(tmp_path / "siglip", config, sd))
  assert model.num_classes == 0
  _check("siglip", model, params, g)
  model, params = checkpoints.from_pretrained(tmp_path / "vit", num_classes=3,
                                              reduction="etps")  # a new head, a method
  assert params["head"]["kernel"].shape == (32, 3) and model.plan().impl.name == "etps"
  with np.load(ROOT / "tests" / "goldens" / "timm" / "dinov2_reg4.npz") as z:
    timm_sd = {k[3:]: z[k] for k in z.files if k.startswith("sd:")}
    images, logits = z["images"], z["logits"]
  timm_config = {"architecture": "vit_small_patch14_reg4_dinov2", "num_classes": 10,
                 "global_pool": "token", "pretrained_cfg": {"tag": "lvd142m",
                                                            "input_size": [3, 56, 56]}}
  model, params = checkpoints.from_pretrained(  # timm's name gives S: the golden's sizes
      _hub_dir(tmp_path / "timm", timm_config, timm_sd), width=32, depth=2, num_heads=2,
      mlp_dim=128)
  assert (model.num_registers, model.image_size, model.num_classes) == (4, 56, 10)
  assert _rel(_logits(model, params, jnp.asarray(np.transpose(images, (0, 2, 3, 1)))),
              logits) <= 1e-4
  with np.load(ROOT / "tests" / "goldens" / "timm" / "siglip_gap.npz") as z:  # "avg": its own
    timm_sd = {k[3:]: z[k] for k in z.files if k.startswith("sd:")}
    images, logits = jnp.asarray(np.transpose(z["images"], (0, 2, 3, 1))), z["logits"]
  timm_config = {"architecture": "vit_base_patch16_siglip_gap_224", "global_pool": "avg",
                 "pretrained_cfg": {"input_size": [3, 64, 64]}}
  model, params = checkpoints.from_pretrained(
      _hub_dir(tmp_path / "gap", timm_config, timm_sd), width=32, depth=2, num_heads=2,
      mlp_dim=128)
  assert (model.pool_type, model.fc_norm) == ("gap", False)
  assert _rel(_logits(model, params, images), logits) <= 1e-4
  # A ViTModel's pooler (Dense + tanh on cls) loads as rep_size's pre_logits.
  g, _, hub, config = _golden("vit")
  pooler = {"vit.pooler.dense.weight": np.eye(32, dtype=np.float32),
            "vit.pooler.dense.bias": np.zeros(32, np.float32)}
  model, params = checkpoints.from_pretrained(_hub_dir(tmp_path / "pooled", config,
                                                       {**hub, **pooler}))
  assert model.rep_size is True and params["pre_logits"]["kernel"].shape == (32, 32)
  # A folder without a config naming a model (a tps_jax workdir's config.json names none) is
  # no Hub directory: load_params reads it as a workdir.
  (tmp_path / "bare").mkdir()
  with pytest.raises(FileNotFoundError, match="holds no config.json naming a timm model"):
    checkpoints.from_pretrained(tmp_path / "bare")
  (tmp_path / "bare" / "config.json").write_text(json.dumps({"model": {"variant": "S/16"}}))
  np.savez(tmp_path / "bare" / "model.safetensors", x=np.zeros(1))
  assert not checkpoints.is_hub_directory(tmp_path / "bare")


def _logits(model, params, images):
  return jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, images)


def test_openclip_hub_directories_load_whole(tmp_path):
  """OpenCLIP's: its own tower from vision_cfg (the projection as the head), or a timm model
  it is built on (`timm_model_name`, weights under visual.trunk.)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  with np.load(ROOT / "tests" / "goldens" / "timm" / "openclip.npz") as z:
    sd = {k[3:]: z[k] for k in z.files if k.startswith("sd:")}
    images, logits = jnp.asarray(np.transpose(z["images"], (0, 2, 3, 1))), z["logits"]
  own = tmp_path / "own"
  own.mkdir()
  (own / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
      "embed_dim": 16, "quick_gelu": True, "text_cfg": {"width": 8},
      "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16,
                     "patch_size": 16}}}))
  save_file(sd, str(own / "open_clip_model.safetensors"))
  model, params = checkpoints.from_pretrained(own)
  assert (model.num_classes, model.gelu, model.num_heads) == (16, "quick", 2)
  assert _rel(_logits(model, params, images), logits) <= 1e-4
  with np.load(ROOT / "tests" / "goldens" / "timm" / "siglip.npz") as z:
    trunk = {"visual.trunk." + k[3:]: z[k] for k in z.files if k.startswith("sd:")}
    images, logits = jnp.asarray(np.transpose(z["images"], (0, 2, 3, 1))), z["logits"]
  built = tmp_path / "trunk"
  built.mkdir()
  config = {"model_cfg": {"embed_dim": 32, "vision_cfg": {
      "image_size": 64, "timm_model_name": "vit_base_patch16_siglip_224", "timm_pool": "map",
      "timm_proj": "none"}}}
  (built / "open_clip_config.json").write_text(json.dumps(config))
  save_file({**trunk, "text.positional_embedding": np.zeros((4, 4), np.float32)},
            str(built / "open_clip_model.safetensors"))
  model, params = checkpoints.from_pretrained(built, width=32, depth=2, num_heads=2, mlp_dim=128)
  assert model.pool_type == "map" and model.num_classes == 10  # the golden's head
  assert _rel(_logits(model, params, images), logits) <= 1e-4
  del config["model_cfg"]["vision_cfg"]["timm_proj"]  # OpenCLIP's default: a linear projection
  (built / "open_clip_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match="timm_proj 'linear' and timm_pool 'map' is not read"):
    checkpoints.from_pretrained(built)
  config["model_cfg"]["vision_cfg"] = {"layers": 2, "ls_init_value": 0.1}
  (built / "open_clip_config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"vision_cfg keys \['ls_init_value'\] are not read"):
    checkpoints.from_pretrained(built)


def test_the_imagenet_recipe_fine_tunes_a_hub_backbone_then_reduces_it(tmp_path):
  """`hub=DIR`: the Hub model at 224 px with a new 1000-class head, fine-tuned dense from its
  weights; then `init=<that run>` reduces it. Reducing it straight from the Hub is refused."""
  from configs import imagenet  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import build_model  # pylint: disable=g-import-not-at-top
  _, _, hub, config = _golden("dinov2_reg")
  directory = _hub_dir(tmp_path / "dino", config, hub)
  c = imagenet.get_config(f"hub={directory}")
  assert c.init.checkpoint == str(directory) and tuple(c.init.fresh) == ("head",)
  assert c.teacher.checkpoint == "" and c.loss.distill_weight == 0.0  # nothing to distil
  model = build_model(c.model, c.num_classes)
  assert (model.num_registers, model.image_size, model.patch_size) == (4, 224, 14)
  params = checkpoints.load_params(c.init.checkpoint, model, fresh=c.init.fresh)
  assert params["pos_embedding"].shape == (1, 256, 32)  # 5 x 5 resampled to 16 x 16
  assert params["head"]["kernel"].shape == (32, 1000)
  g, _, hub, config = _golden("vit")  # a ViTModel with its pooler: rep_size, as from_pretrained
  pooled = _hub_dir(tmp_path / "pooled", config, {
      **hub, "vit.pooler.dense.weight": np.eye(32, dtype=np.float32),
      "vit.pooler.dense.bias": np.zeros(32, np.float32)})
  assert imagenet.get_config(f"hub={pooled}").model.rep_size is True
  dtps = imagenet.get_config(f"hub={directory},init=runs/dino,method=dtps")
  assert dtps.teacher.checkpoint == "runs/dino" and dtps.model.reduction.method == "dtps"
  for straight in (f"hub={directory},method=dtps", f"hub={directory},init={directory},method=dtps"):
    with pytest.raises(ValueError, match="has no ImageNet head to distil 'dtps' from"):
      imagenet.get_config(straight)


def test_timm_hub_configs_read_their_model_args():
  from tps_jax.checkpoints import pretrained  # pylint: disable=g-import-not-at-top
  mae = pretrained.model_kwargs({"architecture": "vit_base_patch16_224", "model_args": {
      "global_pool": "avg"}, "pretrained_cfg": {"tag": "mae", "input_size": [3, 224, 224]}})
  assert (mae["pool_type"], mae["fc_norm"], mae["image_size"]) == ("gap", True, 224)
  dino = {"architecture": "vit_small_patch14_dinov2", "model_args": {"img_size": 224}}
  assert pretrained.model_kwargs(dino)["image_size"] == 224
  with pytest.raises(ValueError, match=r"model_args \['dynamic_img_size'\] of "):
    pretrained.model_kwargs({**dino, "model_args": {"dynamic_img_size": True}})


def test_a_vision_language_models_tower_loads(tmp_path):
  """PaliGemma-style: the SigLIP tower under model.vision_tower.vision_model., a language
  model beside it, the config's vision_config the tower's."""
  g, sd, _, config = _golden("siglip")
  vlm = {f"model.vision_tower.vision_model.{k}": v for k, v in sd.items()
         if not k.startswith(("text_model.", "logit_"))}
  vlm.update({"model.language_model.layers.0.mlp.up_proj.weight": np.zeros((4, 4), np.float32),
              "model.multi_modal_projector.linear.weight": np.zeros((4, 32), np.float32)})
  model, params = checkpoints.from_pretrained(_hub_dir(tmp_path / "vlm", {
      "model_type": "paligemma", "vision_config": config}, vlm))
  assert model.pool_type == "map" and model.num_classes == 0
  _check("siglip", model, params, g)
  # Sharded, the language model's shard is never read (here it is not even a safetensors).
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  (sharded / "config.json").write_text(json.dumps({"model_type": "paligemma",
                                                   "vision_config": config}))
  tower = {k: v for k, v in vlm.items() if ".vision_model." in k}
  save_file(tower, str(sharded / "model-1.safetensors"))
  (sharded / "model-2.safetensors").write_text("a language model's gigabytes")
  (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
      **{k: "model-1.safetensors" for k in tower},
      "model.language_model.layers.0.mlp.up_proj.weight": "model-2.safetensors"}}))
  _check("siglip", *checkpoints.from_pretrained(sharded), g)
