"""Writes tests/goldens/tofu/: OpenToMe's ToFu on seeded inputs (the ToFu authors published no
code; OpenToMe's implementation is the reference).

Provenance of the committed files: Westlake-AI/OpenToMe at commit
4b791cb (`opentome/tome/tome.py`: `bipartite_soft_matching` and its `merge` with modes "tofu"
and "prune"; `opentome/timm/tofu.py`: `tofu_apply_patch`), on timm 0.9.11 (the version its
requirements pin), torch 2.13.0 (CPU, float32).

  git clone https://github.com/Westlake-AI/OpenToMe /tmp/opentome   # or any checkout
  pip download timm==0.9.11 --no-deps -d /tmp/w && python -m zipfile -e /tmp/w/timm-*.whl /tmp/timm
  python scripts/tofu_goldens.py --opentome /tmp/opentome --timm /tmp/timm

`ops.npz` holds operator cases: `metric:<case>` (B, T, C) keys, `x:<case>` (B, T, D) tokens,
`r:<case>`, `cls:<case>` (1: token 0 is cls) and OpenToMe's outputs `tofu:<case>` (MLERP) and
`prune:<case>`. `deit.npz` is OpenToMe's patched model: timm's VisionTransformer as a small
seeded DeiT (64 px, patch 8, width 48, depth 6, 3 heads, 5 classes; blocks 0-3 prune, 4-5 fuse,
their `depth // 2` rule) with `tofu_apply_patch`, its state dict (`sd:<name>`), the images
(NHWC) and the logits at each `r`. No OpenToMe code is committed here.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import types

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "goldens" / "tofu"
RS = (0, 2, 4, 6)  # tokens merged per block in the model golden
# (case, tokens T, r, cls)
CASES = [("cls_t17_r4", 17, 4, True), ("cls_t65_r16", 65, 16, True), ("free_t16_r5", 16, 5, False)]


def _imports(opentome: pathlib.Path, timm_root: pathlib.Path):
  sys.path.insert(0, str(ROOT))
  from scripts.pitome_goldens import _stub_torchvision  # pylint: disable=g-import-not-at-top
  _stub_torchvision()  # timm imports torchvision for its data transforms only
  for name in ("sklearn", "sklearn.cluster"):  # OpenToMe's ATC (not ToFu) imports it
    module = types.ModuleType(name)
    module.AgglomerativeClustering = object
    sys.modules[name] = module
  sys.path[:0] = [str(timm_root), str(opentome)]
  import timm  # pylint: disable=g-import-not-at-top
  assert timm.__version__ == "0.9.11", timm.__version__
  from opentome.tome import tome  # pylint: disable=g-import-not-at-top
  from opentome.timm import tofu  # pylint: disable=g-import-not-at-top
  return timm, tome, tofu


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--opentome", required=True, help="a checkout of Westlake-AI/OpenToMe")
  p.add_argument("--timm", required=True, help="timm 0.9.11 unpacked")
  args = p.parse_args()
  import torch  # pylint: disable=g-import-not-at-top
  timm, tome, tofu = _imports(pathlib.Path(args.opentome), pathlib.Path(args.timm))
  OUT.mkdir(parents=True, exist_ok=True)
  ops = {}
  for i, (case, t, r, cls) in enumerate(CASES):
    rng = np.random.default_rng(300 + i)
    centres = rng.normal(size=(4, 8))  # clustered keys, as trained ViTs have
    metric = (centres[rng.integers(0, 4, (2, t))] + 0.5 * rng.normal(size=(2, t, 8)))
    x = rng.normal(size=(2, t, 12)) * rng.uniform(0.5, 2.0, (2, t, 1))  # norms that differ
    metric, x = metric.astype(np.float32), x.astype(np.float32)
    with torch.no_grad():
      merge, _, _ = tome.bipartite_soft_matching(torch.from_numpy(metric), r, class_token=cls)
      for mode in ("tofu", "prune"):
        ops[f"{mode}:{case}"] = merge(torch.from_numpy(x), mode=mode).numpy()
    ops.update({f"metric:{case}": metric, f"x:{case}": x, f"r:{case}": np.asarray(r),
                f"cls:{case}": np.asarray(int(cls))})
    print(f"{case}: {x.shape} -> {ops[f'tofu:{case}'].shape}")
  np.savez(OUT / "ops.npz", **ops)

  patched_deit(tofu.tofu_apply_patch, OUT / "deit.npz")


def patched_deit(apply_patch, path: pathlib.Path, rs=RS) -> None:
  """OpenToMe's patch (`apply_patch(model)`) on the seeded timm DeiT (pitome_goldens'
  `seeded_deit`, depth 6): its state dict, the images and its logits at each `r`, to `path`."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models.vision_transformer import VisionTransformer  # pylint: disable=g-import-not-at-top
  from scripts.pitome_goldens import seeded_deit  # pylint: disable=g-import-not-at-top
  model = seeded_deit(VisionTransformer, depth=6)
  apply_patch(model)
  images = np.random.default_rng(7).normal(size=(4, 64, 64, 3)).astype(np.float32)
  out = {f"sd:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  out["images"], out["rs"] = images, np.asarray(rs)
  with torch.no_grad():
    for r in rs:
      model.r = r
      out[f"logits:{r}"] = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  np.savez(path, **out)
  print(f"{path.name}: logits at r {tuple(rs)}")


if __name__ == "__main__":
  main()
