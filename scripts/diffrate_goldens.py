"""Writes tests/goldens/diffrate/: the DiffRate authors' own patched DeiT on seeded inputs.

Provenance of the committed file: OpenGVLab/DiffRate at commit
91ae3e376e9c3f9f1e69f580fd902b61de5dfe0e (2023-07-14), `DiffRate/patch/deit.py` (their block,
attention and model), `DiffRate/ddp.py` (the differentiable rate), `DiffRate/merge.py`, on
timm 0.4.5 (the version their README names; torchvision, which timm imports for its data code
only, is stubbed), run with torch 2.13.0 (CPU, float32). No DiffRate code is committed here.

  git clone https://github.com/OpenGVLab/DiffRate /tmp/diffrate   # or any checkout
  pip download timm==0.4.5 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/timm-*.whl /tmp/timm045
  python scripts/diffrate_goldens.py --diffrate /tmp/diffrate --timm /tmp/timm045

`deit.npz`: a small seeded DeiT (64 px, patch 8, width 48, depth 4, 3 heads, 5 classes) with
their patch applied. It holds the state dict (`sd:<name>`), the images (NHWC) and labels, and
- inference (`model.eval()`) under fixed schedules (`set_kept_num`): per schedule the prune and
  merge kept numbers per block (cls included) and the logits and their FLOPs count;
- the search (`model.train()`, as their `train_one_epoch` runs it): the architecture
  parameters (`arch:<block>`, each block's `selected_probability`, seeded), the logits and FLOPs
  of the masked forward, the kept numbers it chose, and the gradients of the cross-entropy and
  of the FLOPs with respect to every block's architecture parameters.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "diffrate"
sys.path.insert(0, str(ROOT / "scripts"))
from pitome_goldens import _stub_torchvision  # pylint: disable=g-import-not-at-top,wrong-import-position

# (prune kept, merge kept) per block, cls included; block 0 never compresses (theirs).
SCHEDULES = {
    "a": ([65, 60, 50, 40], [65, 52, 44, 30]),
    "b": ([65, 65, 40, 40], [65, 50, 50, 20]),
    "merge_only": ([65, 65, 65, 65], [65, 45, 33, 21]),
}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--diffrate", required=True, help="a checkout of OpenGVLab/DiffRate")
  p.add_argument("--timm", required=True, help="timm 0.4.5 unpacked")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  _stub_torchvision()
  sys.path.insert(0, str(args.timm))
  sys.path.insert(0, str(args.diffrate))
  import timm  # pylint: disable=g-import-not-at-top
  assert timm.__version__ == "0.4.5", timm.__version__
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  from DiffRate.patch.deit import apply_patch  # pylint: disable=g-import-not-at-top
  OUT.mkdir(parents=True, exist_ok=True)
  torch.manual_seed(0)
  model = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                            mlp_ratio=4.0, qkv_bias=True, num_classes=5)
  with torch.no_grad():  # a non-trivial head and norms
    for name, prm in model.named_parameters():
      if name.startswith("head") or "norm" in name or name in ("cls_token", "pos_embed"):
        prm.copy_(0.3 * torch.randn_like(prm) + (1.0 if name.endswith("norm.weight") else 0.0))
  apply_patch(model)
  rng = np.random.default_rng(7)
  images = rng.normal(size=(4, 64, 64, 3)).astype(np.float32)
  labels = rng.integers(0, 5, 4)
  out = {f"sd:{k}": v.detach().numpy() for k, v in model.state_dict().items()
         if "ddp" not in k}
  out.update(images=images, labels=labels, schedules=np.asarray(list(SCHEDULES)))
  x = torch.from_numpy(images).permute(0, 3, 1, 2)
  model.eval()
  with torch.no_grad():
    for name, (prune, merge) in SCHEDULES.items():
      model.set_kept_num(prune, merge)
      logits, flops = model(x)
      out[f"prune:{name}"], out[f"merge:{name}"] = np.asarray(prune), np.asarray(merge)
      out[f"logits:{name}"], out[f"flops:{name}"] = logits.numpy(), float(flops)
      print(f"eval {name}: flops {float(flops):.0f}")
  # The search: seeded architecture parameters, then one masked forward and its gradients.
  arch_rng = np.random.default_rng(11)
  with torch.no_grad():
    for i, block in enumerate(model.blocks):
      for kind in ("prune", "merge"):
        ddp = getattr(block, f"{kind}_ddp")
        v = arch_rng.normal(size=ddp.selected_probability.shape) * (2.0 if i else 0.0)
        ddp.selected_probability.copy_(torch.from_numpy(v.astype(np.float32)))
        out[f"arch:{kind}:{i}"] = v.astype(np.float32)
  model.train()
  logits, flops = model(x)
  out["logits:search"] = logits.detach().numpy()
  out["flops:search"] = float(flops)
  out["kept:search"] = np.asarray([[int(b.prune_ddp.kept_token_number),
                                    int(b.merge_ddp.kept_token_number)] for b in model.blocks])
  ce = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
  arch = [getattr(b, f"{k}_ddp").selected_probability for b in model.blocks
          for k in ("prune", "merge")]
  g_ce = torch.autograd.grad(ce, arch, retain_graph=True, allow_unused=True)
  g_fl = torch.autograd.grad(flops, arch, allow_unused=True)
  names = [f"{k}:{i}" for i in range(len(model.blocks)) for k in ("prune", "merge")]
  for n, a, b in zip(names, g_ce, g_fl):
    out[f"grad_ce:{n}"] = np.zeros(1) if a is None else a.numpy()
    out[f"grad_flops:{n}"] = np.zeros(1) if b is None else b.numpy()
  out["ce:search"] = float(ce)
  print(f"search: kept {out['kept:search'].tolist()} flops {float(flops):.0f} ce {float(ce):.4f}")
  np.savez(OUT / "deit.npz", **out)


if __name__ == "__main__":
  main()
