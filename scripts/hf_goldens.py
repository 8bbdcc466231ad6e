"""Writes tests/goldens/hf/<family>.npz: Hugging Face transformers' own forward of the ViTs
people load from the Hub (CLIP, SigLIP, DINOv2 with and without registers, Google's ViT), at
small sizes with seeded weights.

Provenance of the committed files: transformers 5.25.0, torch 2.13.0 (CPU, float32):

  pip install --target /tmp/hftx transformers==5.25.0
  pip install --target /tmp/hf torch==2.13.0
  PYTHONPATH=/tmp/hftx:/tmp/hf python scripts/hf_goldens.py

Each family is transformers' model class built from its config class (`FAMILIES`: width 32,
depth 2, 2 heads), its parameters redrawn from a seed (norm weights and layer scales near 1,
the rest N(0, 0.1)), run on seeded images of `run_size` pixels. A file holds the `config`
(JSON, as `config.json` holds it), the `class_name`, the images (`images`, NCHW), the state
dict (`sd:<name>`, transformers' names, plus a text tower's keys for the two-tower families),
the same tensors as `save_pretrained` writes them to the Hub's `model.safetensors`
(`hub:<name>`, where they differ: the names before transformers 5, which its modules rename on
load: DINOv2's and ViT's), the output
(`output`: logits, the projected embedding, or the pooled vector) and the normalised tokens
(`features`). The DINOv2 families run at a grid other than their position
table's, so transformers interpolates it (without antialiasing for DINOv2, with it for
DINOv2 with registers). No transformers code is committed here.
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "hf"
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def _families(tf):
  """family -> (model class, config, run size, output name, extra state-dict keys)."""
  return {
      "clip": (tf.CLIPVisionModelWithProjection,
               tf.CLIPVisionConfig(**SMALL, image_size=64, patch_size=16, projection_dim=16),
               64, "image_embeds", {"text_model.embeddings.token_embedding.weight": (8, 4),
                                    "logit_scale": ()}),
      "siglip": (tf.SiglipVisionModel,
                 tf.SiglipVisionConfig(**SMALL, image_size=64, patch_size=16),
                 64, "pooler_output", {"text_model.head.weight": (4, 4), "logit_bias": (1,)}),
      "dinov2": (tf.Dinov2Model,
                 tf.Dinov2Config(**{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                                 mlp_ratio=4, image_size=70, patch_size=14),
                 56, "pooler_output", {}),
      "dinov2_reg": (tf.Dinov2WithRegistersModel,
                     tf.Dinov2WithRegistersConfig(
                         **{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                         mlp_ratio=4, image_size=70, patch_size=14, num_register_tokens=4),
                     56, "pooler_output", {}),
      "dinov2_swiglu": (tf.Dinov2Model,
                        tf.Dinov2Config(
                            **{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                            mlp_ratio=4, image_size=56, patch_size=14, use_swiglu_ffn=True),
                        56, "pooler_output", {}),
      "vit": (tf.ViTForImageClassification,
              tf.ViTConfig(**SMALL, image_size=64, patch_size=16, num_labels=10),
              64, "logits", {}),
  }


def _redraw(torch, module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      scale = (name.endswith(("lambda1",)) or
               ("norm" in name.lower() or "layrnorm" in name) and name.endswith("weight"))
      p.copy_(1.0 + 0.2 * noise if scale else 0.1 * noise)


def main() -> None:
  sys.modules["torchvision._meta_registrations"] = types.ModuleType(
      "torchvision._meta_registrations")  # a CUDA torchvision on a CPU torch (names only)
  import torch  # pylint: disable=g-import-not-at-top
  import transformers as tf  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  OUT.mkdir(parents=True, exist_ok=True)
  for seed, (family, (cls, config, size, output, extra)) in enumerate(_families(tf).items()):
    torch.manual_seed(seed)
    model = cls(config).eval()
    _redraw(torch, model, seed)
    images = torch.tensor(np.random.default_rng(seed).normal(size=(2, 3, size, size))
                          .astype(np.float32))
    with torch.no_grad():
      out = model(pixel_values=images, output_hidden_states=True)
    tokens = out.hidden_states[-1]  # the encoder's output, before any final norm
    if family == "clip":
      tokens = model.vision_model.post_layernorm(tokens)
    elif family == "vit":
      tokens = model.vit.layernorm(tokens)
    else:  # SigLIP's and DINOv2's last_hidden_state is normalised already
      tokens = out.last_hidden_state
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    sd.update({k: np.ones(shape, np.float32) for k, shape in extra.items()})
    with tempfile.TemporaryDirectory() as tmp:
      model.save_pretrained(tmp)
      hub = load_file(f"{tmp}/model.safetensors")
    if set(hub) <= set(sd):  # the same names (CLIP, SigLIP): kept once
      hub = {}
    np.savez_compressed(
        OUT / f"{family}.npz", config=np.asarray(config.to_json_string()),
        class_name=np.asarray(cls.__name__), images=images.numpy(),
        output=getattr(out, output).detach().numpy(), features=tokens.detach().numpy(),
        **{f"sd:{k}": v for k, v in sd.items()}, **{f"hub:{k}": v for k, v in hub.items()})
    print(f"{family}: {cls.__name__} at {size} px, {output} "
          f"{tuple(getattr(out, output).shape)}, {len(sd)} tensors")
  print(f"transformers {tf.__version__}, torch {torch.__version__}")


if __name__ == "__main__":
  main()
