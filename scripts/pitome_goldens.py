"""Writes tests/goldens/pitome/: the PiToMe authors' own merge operator on seeded inputs.

Provenance of the committed files: hchautran/PiToMe at commit
550b5deed94aadfeac28bfbe381d87e672044a40 (2025-02-09), `algo/pitome/merge.py` (`pitome_vision` and
`merge_wavg`, as their DeiT patch `algo/pitome/patch/deit.py` calls them), run with
torch 2.13.0 (CPU, float32).

  git clone https://github.com/hchautran/PiToMe /tmp/pitome   # or any checkout
  python scripts/pitome_goldens.py --pitome /tmp/pitome

Each case's file holds the inputs (`metric` (B, 1 + T, C) keys averaged over heads with cls
first, `x` (B, 1 + T, D) tokens, `size` (B, 1 + T, 1) token sizes), the call's arguments
(`ratio`, `margin`, `bsm` 0/1) and the authors' outputs (`x_out`, `size_out`). No PiToMe
code is committed here (its licence is CC BY-NC 4.0).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "pitome"

# (name, tokens T after cls, ratio, margin, bsm): their DeiT margins run 0.75 -> 0 over the
# blocks, bsm in the first half; ratio 0.9 to 0.5 (pitome needs 2r <= T).
CASES = [("bsm_m075_r09", 16, 0.9, 0.75, True), ("bsm_m05_r07", 17, 0.7, 0.5, True),
         ("pitome_m0375_r07", 16, 0.7, 0.375, False), ("pitome_m0_r05", 17, 0.5, 0.0, False),
         ("pitome_m0625_r08", 49, 0.8, 0.625, False)]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pitome", required=True, help="a checkout of hchautran/PiToMe")
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


if __name__ == "__main__":
  main()
