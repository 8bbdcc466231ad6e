"""Writes tests/goldens/pitome/: the PiToMe authors' own merge operator on seeded inputs.

Provenance of the committed files: hchautran/PiToMe at commit
550b5deed94aadfeac28bfbe381d87e672044a40 (2025-02-09), `algo/pitome/merge.py` (`pitome_vision` and
`merge_wavg`, as their DeiT patch `algo/pitome/patch/deit.py` calls them), run with
torch 2.13.0 (CPU, float32).

  git clone https://github.com/hchautran/PiToMe /tmp/pitome   # or any checkout
  pip download timm==0.4.12 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/timm-*.whl /tmp/timm
  python scripts/pitome_goldens.py --pitome /tmp/pitome --timm /tmp/timm

`deit.npz` is the authors' patched model: timm 0.4.12's VisionTransformer (the version their
requirements.txt pins; torchvision, which timm imports for its data code only, is stubbed)
as a small seeded DeiT (64 px, patch 8, width 48, depth 4, 3 heads, 5 classes) with their
`algo/pitome/patch/deit.py` applied and `model.ratio` set; it holds the state dict
(`sd:<name>`), the images (NHWC) and their logits at each ratio.

Each operator case's file holds the inputs (`metric` (B, 1 + T, C) keys averaged over heads with cls
first, `x` (B, 1 + T, D) tokens, `size` (B, 1 + T, 1) token sizes), the call's arguments
(`ratio`, `margin`, `bsm` 0/1) and the authors' outputs (`x_out`, `size_out`). No PiToMe
code is committed here (its licence is CC BY-NC 4.0).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "pitome"

# (name, tokens T after cls, ratio, margin, bsm): their DeiT margins run 0.75 -> 0 over the
# blocks, bsm in the first half; ratio 0.9 to 0.5 (pitome needs 2r <= T).
CASES = [("bsm_m075_r09", 16, 0.9, 0.75, True), ("bsm_m05_r07", 17, 0.7, 0.5, True),
         ("pitome_m0375_r07", 16, 0.7, 0.375, False), ("pitome_m0_r05", 17, 0.5, 0.0, False),
         ("pitome_m0625_r08", 49, 0.8, 0.625, False)]


RATIOS = (0.9, 0.8, 0.7)  # per-block keep ratios of the model golden


def _stub_torchvision():
  """timm 0.4.12 imports torchvision for its data transforms only: any name is a dummy."""
  import importlib.abc  # pylint: disable=g-import-not-at-top
  import importlib.machinery  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  class Any_:  # pylint: disable=invalid-name
    def __init__(self, *a, **k):
      pass

    def __call__(self, *a, **k):
      return self

    def __getattr__(self, name):
      return Any_()

  class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
      if name == "torchvision" or name.startswith("torchvision."):
        return importlib.machinery.ModuleSpec(name, self, is_package=True)
      return None

    def create_module(self, spec):
      module = types.ModuleType(spec.name)
      module.__path__ = []
      module.__getattr__ = lambda attr: Any_()
      return module

    def exec_module(self, module):
      pass

  sys.meta_path.insert(0, Finder())


def seeded_deit(vision_transformer, depth: int):
  """timm's VisionTransformer as a small seeded DeiT (64 px, patch 8, width 48, 3 heads, 5
  classes) with a non-trivial head and norms (timm zero-inits the head), in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = vision_transformer(img_size=64, patch_size=8, embed_dim=48, depth=depth, num_heads=3,
                             mlp_ratio=4.0, qkv_bias=True, num_classes=5)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.startswith("head") or "norm" in name or name in ("cls_token", "pos_embed"):
        p.copy_(0.3 * torch.randn_like(p) + (1.0 if name.endswith("norm.weight") else 0.0))
  return model.eval()


def _load(name: str, path: pathlib.Path, package: bool = False):
  spec = importlib.util.spec_from_file_location(
      name, path, submodule_search_locations=[] if package else None)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def model_golden(pitome_root: pathlib.Path, timm_root: pathlib.Path) -> None:
  """The authors' patched timm DeiT on seeded weights and images."""
  import types  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  _stub_torchvision()
  sys.path.insert(0, str(timm_root))
  import timm  # pylint: disable=g-import-not-at-top
  assert timm.__version__ == "0.4.12", timm.__version__
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  # Their package's __init__ imports every other model's patch (BLIP, CLIP, BERT...): load
  # only merge.py and the timm / DeiT patches, under a package name of our own.
  algo = pitome_root / "algo" / "pitome"
  for name in ("pitome_src", "pitome_src.patch"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = []
  _load("pitome_src.merge", algo / "merge.py")
  _load("pitome_src.patch.timm", algo / "patch" / "timm.py")
  deit = _load("pitome_src.patch.deit", algo / "patch" / "deit.py")
  model = seeded_deit(VisionTransformer, depth=4)
  deit.apply_patch(model)
  images = np.random.default_rng(7).normal(size=(4, 64, 64, 3)).astype(np.float32)
  out = {f"sd:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  out["images"] = images
  out["ratios"] = np.asarray(RATIOS)
  with torch.no_grad():
    for ratio in RATIOS:
      model.ratio = ratio
      logits, _ = model(torch.from_numpy(images).permute(0, 3, 1, 2))
      out[f"logits:{ratio}"] = logits.numpy()
    model.ratio = 1.0
    dense, _ = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    out["logits:1.0"] = dense.numpy()
  np.savez(OUT / "deit.npz", **out)
  print(f"deit: logits at ratios {RATIOS} and 1.0")


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pitome", required=True, help="a checkout of hchautran/PiToMe")
  p.add_argument("--timm", default=None, help="timm 0.4.12 unpacked (for deit.npz)")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "pitome_merge", pathlib.Path(args.pitome) / "algo" / "pitome" / "merge.py")
  merge_lib = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(merge_lib)
  OUT.mkdir(parents=True, exist_ok=True)
  for i, (name, t, ratio, margin, bsm) in enumerate(CASES):
    rng = np.random.default_rng(100 + i)
    b, c, d = 2, 8, 12
    # Clustered keys, as trained ViTs have: some tokens near others, some isolated.
    centres = rng.normal(size=(4, c))
    metric = centres[rng.integers(0, 4, (b, 1 + t))] + 0.6 * rng.normal(size=(b, 1 + t, c))
    x = rng.normal(size=(b, 1 + t, d))
    size = rng.integers(1, 4, (b, 1 + t, 1)).astype(np.float64)
    metric, x, size = (np.asarray(a, np.float32) for a in (metric, x, size))
    with torch.no_grad():
      merge = merge_lib.pitome_vision(metric=torch.from_numpy(metric), ratio=ratio,
                                      margin=margin, class_token=True, use_bsm_pitome=bsm)
      x_out, size_out = merge_lib.merge_wavg(merge, torch.from_numpy(x), torch.from_numpy(size))
    np.savez(OUT / f"{name}.npz", metric=metric, x=x, size=size, ratio=ratio, margin=margin,
             bsm=int(bsm), x_out=x_out.numpy(), size_out=size_out.numpy())
    print(f"{name}: {x.shape} -> {tuple(x_out.shape)}")
  if args.timm:
    model_golden(pathlib.Path(args.pitome), pathlib.Path(args.timm))


if __name__ == "__main__":
  main()
