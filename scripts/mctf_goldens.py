"""Writes tests/goldens/mctf/: the MCTF authors' own fusion operator and model on seeded inputs.

Provenance of the committed files: mlvlab/MCTF at commit
2004da0cad3231fa74cbd60b6042b0bd133aacde (2025-07-30), `utils/mctf.py` (`mctf`, as their
block calls it) and `models/deit.py` with `models/modules/blocks.py` / `models/SA/MHSA.py`
(their patched DeiT), on timm 0.5.4 (the version their mctf.yml pins; torchvision, which
timm imports for its data code only, is stubbed), run with torch 2.13.0 (CPU, float32).

  git clone https://github.com/mlvlab/MCTF /tmp/mctf   # or any checkout
  pip download timm==0.5.4 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/timm-*.whl /tmp/timm054
  python scripts/mctf_goldens.py --mctf /tmp/mctf --timm /tmp/timm054

Each operator case's file holds the inputs (`x` (B, T, D) tokens with cls first where
`protected` is 1, `attn` (B, H, T, T) softmax attention, `size` (B, T, 1) token sizes or
absent for the first merge), the call's settings (`r`, `protected`, `tau_sim`, `tau_info`,
`tau_size`, `bidirection`, `one_step_ahead`, `pooling_type`) and the authors' outputs
(`x_out`, `size_out`, and `attn_out` (B, H, T - r, T - r) for one-step-ahead).

`deit.npz` is their patched model (`models/deit.py`'s VisionTransformer) as a small seeded
DeiT (64 px, patch 8, width 48, depth 4, 3 heads, 5 classes) under several `mctf_type`
settings: the state dict (`sd:<name>`), the images (NHWC) and per variant the logits,
its mctf_type and activated layers.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "mctf"
sys.path.insert(0, str(ROOT / "scripts"))
from pitome_goldens import _stub_torchvision  # pylint: disable=g-import-not-at-top,wrong-import-position

# name: T tokens (cls included where protected), r, protected, tau_sim, tau_info, tau_size,
# bidirection, one_step_ahead, pooling_type (1 attn, 0 size, 3 mean), with sizes.
CASES = {
    "default": (25, 8, 1, 1, 20, 40, 1, 1, 1, True),  # the authors' DeiT setting
    "first_merge": (25, 8, 1, 1, 20, 40, 1, 1, 1, False),  # no sizes yet
    "oneway_size": (24, 7, 1, 1, 20, 40, 0, 1, 0, True),
    "mean_after_block": (27, 5, 1, 1, 20, 40, 1, 0, 3, True),
    "cls_free": (24, 6, 0, 1, 20, 40, 1, 1, 1, True),
    "sim_only": (25, 12, 1, 1, 0, 0, 1, 1, 1, True),
    "info_size_only": (21, 6, 1, 0, 5, 10, 1, 1, 1, True),
}

# Model variants: mctf_type = [r, r_teacher, trace_source, prop_attn, one_step_ahead,
# tau_sim, tau_info, tau_size, bidirection, pooling_type, (unused)], activated layers.
VARIANTS = {
    "default": ([8, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], [1, 2, 3]),  # run/eval_deit_*_mctf.sh
    "fast": ([0.35, 0, 0, 1, 1, 1, 20, 40, 1, 1, 0], [1, 3]),  # *_fast.sh's shape
    "after_block": ([6, 0, 0, 1, 0, 1, 20, 40, 0, 0, 0], [0, 1, 2]),
    "precise": ([7, 0, 0, 1, 2, 1, 20, 40, 1, 3, 0], [1, 2, 3]),
    "no_prop": ([8, 0, 0, 0, 1, 1, 20, 40, 1, 1, 0], [1, 2, 3]),
}


def operator_goldens(mctf_root: pathlib.Path) -> None:
  import torch  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(mctf_root))
  from utils.mctf import mctf  # pylint: disable=g-import-not-at-top
  for i, (name, (t, r, prot, ts, ti, tz, bi, osa, pool, with_size)) in enumerate(CASES.items()):
    rng = np.random.default_rng(200 + i)
    b, h, d = 2, 3, 12
    centres = rng.normal(size=(5, d))  # clustered tokens, as trained ViTs have
    x = centres[rng.integers(0, 5, (b, t))] + 0.7 * rng.normal(size=(b, t, d))
    logits = 1.5 * rng.normal(size=(b, h, t, t))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    size = rng.integers(1, 4, (b, t, 1)).astype(np.float64)
    x, attn, size = (np.asarray(a, np.float32) for a in (x, attn, size))
    info = {"num_protected": prot, "r_eval": r, "tau_sim": ts, "tau_info": ti, "tau_size": tz,
            "student_size": torch.from_numpy(size) if with_size else None,
            "bidirection": bi, "trace_source": 0, "one_step_ahead": osa, "pooling_type": pool}
    with torch.no_grad():
      x_out, attn_out = mctf(torch.from_numpy(x), torch.from_numpy(attn), info, "student_")
    out = dict(x=x, attn=attn, r=r, protected=prot, tau_sim=ts, tau_info=ti, tau_size=tz,
               bidirection=bi, one_step_ahead=osa, pooling_type=pool,
               x_out=x_out.numpy(), size_out=info["student_size"].numpy())
    if with_size:
      out["size"] = size
    if osa:
      out["attn_out"] = attn_out.numpy()
    np.savez(OUT / f"{name}.npz", **out)
    print(f"{name}: {x.shape} -> {tuple(x_out.shape)}")


def model_golden(mctf_root: pathlib.Path, timm_root: pathlib.Path) -> None:
  """The authors' MCTF DeiT on seeded weights and images, under each variant."""
  import torch  # pylint: disable=g-import-not-at-top
  from functools import partial  # pylint: disable=g-import-not-at-top
  _stub_torchvision()
  sys.path.insert(0, str(timm_root))
  sys.path.insert(0, str(mctf_root))
  import timm  # pylint: disable=g-import-not-at-top
  assert timm.__version__ == "0.5.4", timm.__version__
  from models.deit import VisionTransformer  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(7).normal(size=(4, 64, 64, 3)).astype(np.float32)
  out = {"images": images, "variants": np.asarray(list(VARIANTS))}
  sd = None
  for name, (mctf_type, layers) in VARIANTS.items():
    torch.manual_seed(0)
    model = VisionTransformer(input_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3,
                              mlp_ratio=4.0, qkv_bias=True, num_classes=5,
                              norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                              task_type=[1, 0, 0, 0], mctf_type=mctf_type, use_mctf=True,
                              activate_layer=layers)
    with torch.no_grad():  # a non-trivial head and norms (timm zero-inits the head)
      for pname, p in model.named_parameters():
        if pname.startswith("head") or "norm" in pname or pname in ("cls_token", "pos_embed"):
          p.copy_(0.3 * torch.randn_like(p) + (1.0 if pname.endswith("norm.weight") else 0.0))
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    if sd is None:
      sd = state
    assert all(np.array_equal(sd[k], state[k]) for k in sd), "seeded weights differ"
    model.eval()
    with torch.no_grad():
      logits = model(torch.from_numpy(images).permute(0, 3, 1, 2))
      model.info["use_mctf"] = False
      dense = model(torch.from_numpy(images).permute(0, 3, 1, 2))
    out[f"logits:{name}"] = logits.numpy()
    out[f"mctf_type:{name}"] = np.asarray(mctf_type, np.float64)
    out[f"layers:{name}"] = np.asarray(layers)
    out["logits:dense"] = dense.numpy()
    print(f"deit {name}: logits {tuple(logits.shape)}")
  out.update({f"sd:{k}": v for k, v in sd.items()})
  np.savez(OUT / "deit.npz", **out)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mctf", required=True, help="a checkout of mlvlab/MCTF")
  p.add_argument("--timm", default=None, help="timm 0.5.4 unpacked (for deit.npz)")
  args = p.parse_args()
  OUT.mkdir(parents=True, exist_ok=True)
  operator_goldens(pathlib.Path(args.mctf))
  if args.timm:
    model_golden(pathlib.Path(args.mctf), pathlib.Path(args.timm))


if __name__ == "__main__":
  main()
