"""Writes tests/goldens/timm/<family>.npz: timm's (and OpenCLIP's) own forward of the ViT
families people reduce, built by their real model names at small sizes with seeded weights.

Provenance of the committed files: timm 1.0.15 and open_clip_torch 3.3.0 (pure-Python wheels),
torch 2.13.0 (CPU, float32):

  pip download timm==1.0.15 open_clip_torch==3.3.0 --no-deps -d /tmp/wheels
  pip install --target /tmp/hf torch==2.13.0 torchvision ftfy wcwidth
  python scripts/timm_goldens.py --site /tmp/hf --wheels /tmp/wheels

Each family is `timm.create_model(<name>, pretrained=False, ...)` with the width, depth, heads,
image size and classes overridden (`FAMILIES`), its parameters redrawn from a seed so that
layer scales, norms and biases are far from their initial values, and run on seeded images.
A file holds the model's `name`, its `kwargs` (JSON), the images (`images`, NCHW), the state
dict (`sd:<name>`, timm's names; OpenCLIP's for "openclip"), the logits (`logits`, the
projected embedding for CLIP towers) and the normalised tokens (`features`,
`forward_features`). "dinov2_resampled" holds a DINOv2 state dict for a 5 x 5 grid and the
logits of timm's model at 4 x 4 after timm's own loader resampled its position table
(`checkpoint_filter_fn`: bicubic, antialiased); "dinov2_patch16" a DINOv2 patch-14 state dict
and the logits of the same model at patch 16 (64 px, the same 4 x 4 grid) after that loader
resampled its patch kernel (FlexiViT's pseudo-inverse resize). No timm or OpenCLIP code is
committed here.

torchvision's CUDA build lacks its operators on a CPU-only torch; timm imports it only for
names, so its operator registration is skipped here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import types
import zipfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "timm"
SMALL = dict(embed_dim=32, depth=2, num_heads=2)
# family -> (timm name, overrides): 16 patches each, so every method's example reduces them.
FAMILIES = {
    "deit3": ("deit3_small_patch16_224", dict(img_size=64, num_classes=10)),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=56, num_classes=10)),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, num_classes=10)),
    "clip_openai": ("vit_base_patch16_clip_quickgelu_224", dict(img_size=64, num_classes=16)),
    "clip_laion": ("vit_base_patch16_clip_224", dict(img_size=64, num_classes=16)),
    "mae": ("vit_base_patch16_224.mae", dict(img_size=64, num_classes=10, global_pool="avg")),
    "siglip": ("vit_base_patch16_siglip_224", dict(img_size=64, num_classes=10)),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", dict(img_size=64, num_classes=10)),
    # DINOv2 giant's packed SwiGLU MLP at width 32: fc1 (170, 32), fc2 (32, 85)
    "dinov2_giant": ("vit_giant_patch14_dinov2", dict(img_size=56, num_classes=10)),
}


def _imports(site: str, wheels: str | None):
  sys.path.append(site)
  if wheels:  # the pure-Python wheels, unpacked once
    unpacked = pathlib.Path("/tmp/timm_goldens_src")
    for wheel in sorted(pathlib.Path(wheels).glob("*.whl")):
      if wheel.name.startswith(("timm-", "open_clip_torch-")):
        with zipfile.ZipFile(wheel) as z:
          z.extractall(unpacked)
    sys.path.insert(0, str(unpacked))
  sys.modules["torchvision._meta_registrations"] = types.ModuleType(
      "torchvision._meta_registrations")
  import open_clip  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  return torch, timm, open_clip


def _redraw(torch, module, seed: int) -> None:
  """Every parameter from a seed: scales (norm weights, layer scales) near 1, the rest
  N(0, 0.1), so that nothing the loader maps can hide behind an initial value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      scale = name.endswith(("gamma", "norm.weight", "norm1.weight", "norm2.weight",
                             "norm_pre.weight", "fc_norm.weight", "ln_1.weight",
                             "ln_2.weight", "ln_pre.weight", "ln_post.weight"))
      p.copy_(1.0 + 0.2 * noise if scale else 0.1 * noise)


def _images(torch, size: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  return torch.tensor(rng.normal(size=(2, 3, size, size)).astype(np.float32))


def _save(name: str, timm_name: str, kwargs: dict, images, sd, logits, features) -> None:
  OUT.mkdir(parents=True, exist_ok=True)
  arrays = {f"sd:{k}": v.detach().numpy() for k, v in sd.items()}
  np.savez_compressed(OUT / f"{name}.npz", name=np.asarray(timm_name),
                      kwargs=np.asarray(json.dumps(kwargs)), images=images.numpy(),
                      logits=logits.detach().numpy(),
                      features=(features.detach().numpy() if features is not None
                                else np.zeros(0, np.float32)), **arrays)
  print(f"{name}: {timm_name} logits {tuple(logits.shape)}, {len(sd)} tensors")


def _through_timms_loader(torch, timm, family, timm_name, source, kwargs, size, seed) -> None:
  """A checkpoint of `timm_name` built with `source` loaded into one built with `kwargs` by
  timm's own loader; saved with the checkpoint's state dict and the loaded model's logits."""
  from timm.models.vision_transformer import checkpoint_filter_fn  # pylint: disable=g-import-not-at-top
  big = timm.create_model(timm_name, pretrained=False, **{**SMALL, **source})
  _redraw(torch, big, seed)
  small = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
  small.load_state_dict(checkpoint_filter_fn(big.state_dict(), small))
  images = _images(torch, size, seed)
  with torch.no_grad():
    logits = small(images)
  _save(family, timm_name, kwargs, images, big.state_dict(), logits, None)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--site", default="/tmp/hf", help="where torch (and friends) live")
  parser.add_argument("--wheels", default=None, help="a folder with timm / open_clip wheels")
  args = parser.parse_args()
  torch, timm, open_clip = _imports(args.site, args.wheels)
  torch.manual_seed(0)
  for seed, (family, (timm_name, over)) in enumerate(FAMILIES.items()):
    kwargs = {**SMALL, **over}
    model = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    _redraw(torch, model, seed)
    images = _images(torch, kwargs["img_size"], seed)
    with torch.no_grad():
      features = model.forward_features(images)
      logits = model.forward_head(features)
    _save(family, timm_name, kwargs, images, model.state_dict(), logits, features)

  # DINOv2 through timm's own loader (checkpoint_filter_fn) into another model: its table
  # from a 5 x 5 grid to 4 x 4, and its patch-14 kernel into a patch-16 model (same grid).
  timm_name, over = FAMILIES["dinov2"]
  _through_timms_loader(torch, timm, "dinov2_resampled", timm_name, {**over, "img_size": 70},
                        {**SMALL, **over}, 56, 11)
  _through_timms_loader(torch, timm, "dinov2_patch16", timm_name, over,
                        {**SMALL, **over, "img_size": 64, "patch_size": 16}, 64, 13)

  # OpenCLIP's own tower (OpenAI's layout: quick GELU, no patch bias, ln_pre, a projection).
  tower = open_clip.transformer.VisionTransformer(
      image_size=64, patch_size=16, width=32, layers=2, heads=2, mlp_ratio=4.0,
      output_dim=16, act_layer=open_clip.transformer.QuickGELU).eval()
  _redraw(torch, tower, 12)
  images = _images(torch, 64, 12)
  with torch.no_grad():
    logits = tower(images)
  sd = {f"visual.{k}": v for k, v in tower.state_dict().items()}
  sd["logit_scale"] = torch.ones(())  # a text-side key the image loader leaves out
  _save("openclip", "open_clip.transformer.VisionTransformer",
        dict(image_size=64, patch_size=16, width=32, layers=2, heads=2, output_dim=16,
             act_layer="QuickGELU"), images, sd, logits, None)


if __name__ == "__main__":
  main()
