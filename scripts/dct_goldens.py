"""Writes tests/goldens/dct/: OpenToMe's DCT token reduction on seeded inputs.

Provenance of the committed files: Westlake-AI/OpenToMe at commit 4b791cb
(`opentome/tome/dct.py`: `dc_matching`; `opentome/timm/dct.py`: `dct_apply_patch`), on timm
0.9.11 (the version its requirements pin), torch 2.13.0 (CPU, float32).

  git clone https://github.com/Westlake-AI/OpenToMe /tmp/opentome   # or any checkout
  pip download timm==0.9.11 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/timm-*.whl /tmp/timm
  python scripts/dct_goldens.py --opentome /tmp/opentome --timm /tmp/timm

`ops.npz` holds operator cases: `x:<case>` (B, T, C) tokens, `r:<case>`, `cls:<case>` (1: token
0 is cls) and OpenToMe's output `dct:<case>`. `deit.npz` is OpenToMe's patched model: timm's
VisionTransformer as a small seeded DeiT (64 px, patch 8, width 48, depth 6, 3 heads, 5
classes) with `dct_apply_patch`, its state dict (`sd:<name>`), the images (NHWC) and the logits
at each `r` (`logits:<r>`). No OpenToMe code is committed here.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from scripts.tofu_goldens import _imports, patched_deit  # noqa: E402  (OpenToMe, timm 0.9.11)

OUT = ROOT / "tests" / "goldens" / "dct"
RS = (0, 2, 4, 6)  # tokens removed per block in the model golden
# (case, tokens T, r, cls)
CASES = [("cls_t17_r4", 17, 4, True), ("cls_t65_r32", 65, 32, True), ("free_t16_r5", 16, 5, False),
         ("free_t9_r1", 9, 1, False)]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--opentome", required=True, help="a checkout of Westlake-AI/OpenToMe")
  p.add_argument("--timm", required=True, help="timm 0.9.11 unpacked")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  _imports(pathlib.Path(args.opentome), pathlib.Path(args.timm))
  from opentome.tome import dct as tome_dct  # pylint: disable=g-import-not-at-top
  from opentome.timm import dct  # pylint: disable=g-import-not-at-top
  OUT.mkdir(parents=True, exist_ok=True)
  ops = {}
  for i, (case, t, r, cls) in enumerate(CASES):
    x = np.random.default_rng(500 + i).normal(size=(2, t, 12)).astype(np.float32)
    with torch.no_grad():
      ops[f"dct:{case}"] = tome_dct.dc_matching(torch.from_numpy(x), r, class_token=cls,
                                                distill_token=False).numpy()
    ops.update({f"x:{case}": x, f"r:{case}": np.asarray(r), f"cls:{case}": np.asarray(int(cls))})
    print(f"{case}: {x.shape} -> {ops[f'dct:{case}'].shape}")
  np.savez(OUT / "ops.npz", **ops)

  patched_deit(dct.dct_apply_patch, OUT / "deit.npz", RS)

if __name__ == "__main__":
  main()
