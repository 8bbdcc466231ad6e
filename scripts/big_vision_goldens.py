"""Writes tests/goldens/big_vision/: big_vision's own ViT run on seeded inputs.

Provenance of the committed files: google-research/big_vision at commit
0127fb6b337ee2a27bf4e54dea79cff176527356 (2025-05-19), `big_vision/models/vit.py` and
`big_vision/models/common.py`, run with jax 0.10.2 / flax 0.12.8 on CPU, float32.

  git clone https://github.com/google-research/big_vision /tmp/bv_repo   # or any checkout
  python scripts/big_vision_goldens.py --big_vision /tmp/bv_repo

Only the model file runs (`benchmarks.big_vision_inference.import_vit`): big_vision's `utils`
(which needs TensorFlow) is replaced by an empty module, which `vit.Model` never calls. Each
config's file holds the parameters (`param:<a/b/c>`), the input image (`image`) and
big_vision's outputs (`out:<key>`), plus `config` (JSON). `fix_old.npz` holds an old-style
checkpoint and big_vision's `fix_old_checkpoints` of it; `resample.npz` a position table and
`resample_posemb`'s result.
No big_vision code is committed here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import big_vision_inference  # noqa: E402  (its import of big_vision's vit.py)
OUT = ROOT / "tests" / "goldens" / "big_vision"
IMAGE = (2, 16, 16, 3)  # a 4 x 4 grid of 4 px patches
BASE = dict(num_classes=5, patch_size=(4, 4), width=32, depth=3, mlp_dim=64, num_heads=2)
# name -> big_vision fields on top of BASE (every pool type, both posembs, rep_size, scan).
CONFIGS = {
    "tok_learn": dict(pool_type="tok"),
    "gap_learn": dict(pool_type="gap"),
    "map_learn": dict(pool_type="map"),
    "zero_sincos": dict(pool_type="0", posemb="sincos2d"),
    "none_learn": dict(pool_type="none"),
    "gap_sincos_rep": dict(pool_type="gap", posemb="sincos2d", rep_size=24),
    "map_scan_rep": dict(pool_type="map", scan=True, rep_size=True),
    "tok_scan": dict(pool_type="tok", scan=True),
    "gap_scan": dict(pool_type="gap", scan=True),
}


def flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--big_vision", required=True, type=pathlib.Path,
                 help="a checkout of google-research/big_vision")
  args = p.parse_args()
  bv_vit = big_vision_inference.import_vit(args.big_vision.resolve())
  OUT.mkdir(parents=True, exist_ok=True)
  image = np.random.default_rng(0).normal(size=IMAGE).astype(np.float32)
  for i, (name, extra) in enumerate(CONFIGS.items()):
    cfg = {**BASE, **extra}
    model = bv_vit.Model(**cfg)
    params = model.init(jax.random.key(i), jnp.asarray(image))["params"]
    # head_zeroinit leaves a zero head: give every array seeded values so the logits test it.
    rng = np.random.default_rng(100 + i)
    params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32)
                          if a.ndim > 1 and not a.any() else np.asarray(a), params)
    _, out = model.apply({"params": params}, jnp.asarray(image))
    arrays = {f"param:{k}": v for k, v in flat(params).items()}
    arrays.update({f"out:{k}": np.asarray(out[k]) for k in
                   ("encoded", "pre_logits", "logits", "head_input", "pre_logits_2d",
                    "logits_2d") if k in out})
    np.savez(OUT / f"{name}.npz", image=image, config=np.asarray(json.dumps(cfg)), **arrays)
    print(f"{name}: {sorted(k for k in arrays if k.startswith('out:'))}")

  # An old-style checkpoint (pre-linen names, posemb in Transformer/posembed_input with a cls
  # row) and big_vision's fix of it.
  tok = dict(np.load(OUT / "tok_learn.npz"))
  params = {k[len("param:"):]: v for k, v in tok.items() if k.startswith("param:")}
  old = {}
  for k, v in params.items():
    k = (k.replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1")
         .replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3"))
    if k == "pos_embedding":
      cls_row = np.random.default_rng(7).normal(size=(1, 1, v.shape[-1])).astype(np.float32)
      k, v = "Transformer/posembed_input/pos_embedding", np.concatenate([cls_row, v], 1)
    old[k] = v

  def tree(flat_map):
    out = {}
    for k, v in flat_map.items():
      node = out
      *parents, leaf = k.split("/")
      for part in parents:
        node = node.setdefault(part, {})
      node[leaf] = v
    return out

  # (a copy: big_vision adds the cls row into `cls` in place)
  fixed = bv_vit.fix_old_checkpoints(tree({k: v.copy() for k, v in old.items()}))
  np.savez(OUT / "fix_old.npz", **{f"old:{k}": v for k, v in old.items()},
           **{f"fixed:{k}": v for k, v in flat(fixed).items()})
  table = np.random.default_rng(3).normal(size=(1, 16, 8)).astype(np.float32)
  np.savez(OUT / "resample.npz", old=table,
           new=bv_vit.resample_posemb(table, np.zeros((1, 36, 8), np.float32)))
  print(f"wrote {OUT}")


if __name__ == "__main__":
  main()
