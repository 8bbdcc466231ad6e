"""Writes tests/goldens/visionzip/visionzip.npz: the VisionZip authors' reduction of a CLIP
vision tower, run on a small seeded tower.

Provenance of the committed file: dvlab-research/VisionZip at commit 3151f6d
(`visionzip/utils.py`: `CLIPAttention_forward`, `CLIP_EncoderLayer_forward`, `apply_info`;
`visionzip/clip_encoder.py`: `CLIPVisionTower_VisionZip.forward`), on transformers 4.37.2 (the
version LLaVA pins), torch 2.13.0 (CPU, float32).

  git clone https://github.com/dvlab-research/VisionZip /tmp/visionzip   # or any checkout
  pip install --target /tmp/hf torch==2.13.0 transformers==4.37.2
  PYTHONPATH=/tmp/hf python scripts/visionzip_goldens.py --visionzip /tmp/visionzip

The tower is transformers' `CLIPVisionModel` with 24 layers (the authors' `apply_info` marks
layer 22 of 24, CLIP-L's layer -2, as the one to reduce at), width 48, 3 heads, MLP 96, exact
GELU, LayerNorm epsilon 1e-6, 32 px images in 8 px patches (16 patches and cls), random
weights from a seed. Their forward is run as LLaVA runs it (`CLIPVisionTower.forward` patched
by theirs), with a stand-in for LLaVA's tower object holding the CLIP model.

The file holds the config (`config`, JSON), the images (`images`, NCHW), the state dict
(`sd:<name>`), the encoder's input after the pre-norm (`embed`), and per case
`<case>` = `d<dominant>_c<contextual>` (dominant counting cls, as the authors' argument):
their output (`out:<case>`, cls + dominant + contextual tokens) and kept indices
(`indices:<case>`), and the layer's hidden states, attention and key metric they read
(`hidden`, `attn`, `metric`). No VisionZip code is committed here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "visionzip"
CONFIG = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=24, num_attention_heads=3,
              image_size=32, patch_size=8, num_channels=3, hidden_act="gelu",
              layer_norm_eps=1e-6)
# (dominant as the authors count it, cls included; contextual) on 16 patches
CASES = ((6, 4), (10, 3), (3, 7), (5, 5), (11, 6))


def _authors(repo: pathlib.Path):
  """Their two modules, without the package's __init__ (it imports LLaVA)."""
  package = types.ModuleType("visionzip")
  package.__path__ = [str(repo / "visionzip")]
  sys.modules["visionzip"] = package
  loaded = {}
  for name in ("utils", "clip_encoder"):
    spec = importlib.util.spec_from_file_location(f"visionzip.{name}",
                                                  repo / "visionzip" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"visionzip.{name}"] = module
    spec.loader.exec_module(module)
    loaded[name] = module
  return loaded["utils"], loaded["clip_encoder"]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--visionzip", required=True, type=pathlib.Path,
                 help="a checkout of dvlab-research/VisionZip")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.clip import modeling_clip  # pylint: disable=g-import-not-at-top
  assert transformers.__version__ == "4.37.2", transformers.__version__
  utils, clip_encoder = _authors(args.visionzip)
  # What their visionzip() patches into transformers' CLIP (LLaVA's half is the tower below).
  modeling_clip.CLIPEncoderLayer.forward = utils.CLIP_EncoderLayer_forward
  modeling_clip.CLIPAttention.forward = utils.CLIPAttention_forward

  torch.manual_seed(0)
  clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CONFIG)).eval()
  with torch.no_grad():  # livelier than the init's small values: LayerNorms and biases too
    for name, t in clip.named_parameters():
      if "norm" in name:
        t.copy_(1.0 + 0.2 * torch.randn_like(t) if name.endswith("weight")
                else 0.2 * torch.randn_like(t))
      elif name.endswith("bias"):
        t.copy_(0.1 * torch.randn_like(t))
  images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))

  class Tower(torch.nn.Module):  # LLaVA's CLIPVisionTower, as much as their forward reads
    def __init__(self, vision_tower):
      super().__init__()
      self.vision_tower = vision_tower
    device = property(lambda self: torch.device("cpu"))
    dtype = property(lambda self: torch.float32)

  arrays = {f"sd:{k}": v.numpy() for k, v in clip.state_dict().items()}
  for dominant, contextual in CASES:
    tower = Tower(clip)
    utils.apply_info(clip, dominant_num=dominant - 1, contextual_num=contextual)
    with torch.no_grad():
      out, indices = clip_encoder.CLIPVisionTower_VisionZip.forward(tower, images)
      full = clip(images, output_hidden_states=True, output_attentions=True)
    case = f"d{dominant}_c{contextual}"
    arrays[f"out:{case}"], arrays[f"indices:{case}"] = out.numpy(), indices.numpy()
    arrays["hidden"], arrays["attn"] = full.hidden_states[-2].numpy(), full.attentions[-2].numpy()
    arrays["metric"] = clip.vision_model.encoder.layers[-2].metric.numpy()
    arrays["embed"] = full.hidden_states[0].numpy()
    print(f"{case}: {tuple(out.shape)}")
  OUT.mkdir(parents=True, exist_ok=True)
  np.savez(OUT / "visionzip.npz", config=np.asarray(json.dumps(CONFIG)),
           images=images.numpy(), **arrays)
  print(f"wrote {OUT / 'visionzip.npz'}")


if __name__ == "__main__":
  main()
