"""Writes tests/goldens/big_vision/{two_towers,one_tower}.npz: big_vision's own SigLIP two-tower
model (`big_vision/models/proj/image_text/two_towers.py`) and CLIPPO one-tower model
(`proj/clippo/one_tower.py`) building their image tower from big_vision's `vit` and, after
`tps_jax.big_vision.register()`, from `tps_vit` (ours), on seeded parameters.

Provenance: google-research/big_vision at commit 0127fb6b337ee2a27bf4e54dea79cff176527356,
run with this checkout's tps_jax on CPU, float32.

  git clone https://github.com/google-research/big_vision /tmp/bv_repo   # or any checkout
  python scripts/towers_goldens.py --big_vision /tmp/bv_repo

The file holds the image tower's config (`config`, JSON), the image, the parameters
(`param:<a/b/c>`, the two-tower tree: `img/...` and `t`), and big_vision's outputs:
`zimg:vit` (its own tower), `zimg:tps_keep1` (ours at keep 1.0 inside its model),
`zimg:tps_etps` and `tokens:tps_etps` (ours reducing at keep 0.5), and `loaded:<a/b/c>`, what
`two_towers.load` returns for our tower from an `.npz` of the image tower with the score heads
of a dTPS tower left at init by `dont_load`. `one_tower.npz` holds the same for CLIPPO, whose
one tower embeds both the image and the text rendered as an image (`text`): `zimg:*`,
`ztxt:*`. `paligemma.npz` holds PaliGemma (`proj/paligemma/paligemma.py`) with a small random
Gemma (`gemma_tiny`: width 32, depth 2, 2 heads, vocab 64; patched into `ppp/gemma.get_config`)
and a pool-"none" image tower whose every token is the LLM's prefix: `text` (int32 tokens),
`logits:*` (text logits), `prefix:*` (image tokens in the prefix) for vit, ours at keep 1.0,
ours with eTPS at keep 0.5 and ours with VisionZip (5 dominant and 3 contextual tokens at
block 1, the tower's layer -2). No big_vision code is committed here.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.big_vision_inference import import_vit  # noqa: E402
from scripts.big_vision_goldens import flat  # noqa: E402

GOLDENS = ROOT / "tests" / "goldens" / "big_vision"
IMAGE = (2, 16, 16, 3)
TOWER = dict(variant=None, patch_size=(4, 4), width=32, depth=3, mlp_dim=64, num_heads=2,
             pool_type="map")
OUT_DIM = 16


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--big_vision", required=True, type=pathlib.Path,
                 help="a checkout of google-research/big_vision")
  args = p.parse_args()
  import_vit(args.big_vision.resolve())  # big_vision as a package, without TensorFlow
  import big_vision.models.proj.image_text.two_towers as two_towers  # pylint: disable=g-import-not-at-top
  import big_vision.models.proj.clippo.one_tower as one_tower  # pylint: disable=g-import-not-at-top
  from tps_jax import big_vision as tps_vit  # pylint: disable=g-import-not-at-top
  tps_vit.register()
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=IMAGE).astype(np.float32))
  text = jnp.asarray(rng.normal(size=IMAGE).astype(np.float32))  # CLIPPO's rendered text
  cfg = {k: v for k, v in TOWER.items() if v is not None}
  for lib, name, inputs in ((two_towers, "two_towers", (image,)),
                            (one_tower, "one_tower", (image, text))):
    write(lib, GOLDENS / f"{name}.npz", cfg, inputs)
  paligemma(image)


def paligemma(image) -> None:
  """PaliGemma with a tiny Gemma: the image tower's tokens are the LLM's prefix."""
  from big_vision.models.ppp import gemma  # pylint: disable=g-import-not-at-top
  import big_vision.models.proj.paligemma.paligemma as pg  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  real = gemma.get_config
  gemma.get_config = lambda variant: (ml_collections.ConfigDict(dict(
      variant=variant, width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1,
      head_dim=16, norm_eps=1e-6, vocab_size=64, scan=True, remat_policy="nothing_saveable"))
      if variant == "gemma_tiny" else real(variant))
  tower = dict(patch_size=(4, 4), width=32, depth=3, mlp_dim=64, num_heads=2, pool_type="none")
  llm = dict(variant="gemma_tiny", cache_dtype=None)
  text = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 6)), jnp.int32)
  mask_ar = jnp.asarray([[0, 0, 0, 1, 1, 1]] * 2, jnp.int32)  # a prefix, then causal

  def model(img_model, **extra):
    return pg.Model(img_model=img_model, img={**tower, **extra}, llm=llm)

  params = model("vit").init(jax.random.key(0), image, text, mask_ar)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32)
                        if a.ndim > 1 and not a.any() else np.asarray(a), params)
  arrays = {f"param:{k}": v for k, v in flat(params).items()}
  for key, m in (("vit", model("vit")),
                 ("tps_keep1", model("tps_vit", reduction=dict(method="etps", keep_ratio=1.0,
                                                               locations=(1,)))),
                 ("tps_etps", model("tps_vit", reduction=dict(method="etps", keep_ratio=0.5,
                                                              locations=(1,)))),
                 ("tps_visionzip", model("tps_vit", reduction=dict(
                     method="visionzip", dominant=5, contextual=3)))):
    logits, out = jax.jit(lambda p, *x, m=m: m.apply({"params": p}, *x))(params, image, text,
                                                                         mask_ar)
    arrays[f"logits:{key}"] = np.asarray(logits)
    arrays[f"prefix:{key}"] = np.asarray(out["img/zimg"].shape[1])
    arrays[f"zimg:{key}"] = np.asarray(out["img/zimg"])
  out_path = GOLDENS / "paligemma.npz"
  np.savez(out_path, config=np.asarray(json.dumps(tower)), image=np.asarray(image),
           text=np.asarray(text), mask_ar=np.asarray(mask_ar), **arrays)
  print(f"wrote {out_path}: prefix "
        f"{[int(arrays[f'prefix:{k}']) for k in ('vit', 'tps_keep1', 'tps_etps', 'tps_visionzip')]}")


def write(lib, out_path: pathlib.Path, cfg: dict, inputs: tuple) -> None:
  """One big_vision model's goldens with its vit tower and ours."""
  def model(image_model, **extra):
    return lib.Model(image={**cfg, **extra}, image_model=image_model, out_dim=OUT_DIM)

  params = model("vit").init(jax.random.key(0), *inputs)["params"]
  rng = np.random.default_rng(1)  # head_zeroinit leaves a zero head: seeded values instead
  params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(np.float32)
                        if a.ndim > 1 and not a.any() else np.asarray(a), params)
  arrays = {f"param:{k}": v for k, v in flat(params).items()}
  run = lambda m: jax.jit(lambda p, *x: m.apply({"params": p}, *x))(params, *inputs)

  def record(key, m):
    zimg, ztxt, out = run(m)
    arrays[f"zimg:{key}"] = np.asarray(zimg)
    if ztxt is not None:
      arrays[f"ztxt:{key}"] = np.asarray(ztxt)
    return out

  record("vit", model("vit"))
  record("tps_keep1", model("tps_vit", reduction=dict(method="etps", keep_ratio=1.0,
                                                     locations=(1,))))
  out = record("tps_etps", model("tps_vit", reduction=dict(method="etps", keep_ratio=0.5,
                                                           locations=(1,))))
  arrays["tokens:tps_etps"] = np.asarray(out["img/encoded"].shape[1])
  # `load` reaches our `load` for the image tower: a dTPS tower's new score heads stay at init
  # under dont_load.
  reduction = dict(method="dtps", keep_ratio=0.5, locations=(1,))
  dtps = model("tps_vit", reduction=reduction)
  init = jax.jit(dtps.init)(jax.random.key(2), *inputs)["params"]
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "img.npz"
    np.savez(path, **flat(params["img"]))
    loaded = lib.load(init, {"img": str(path)},
                      _Config(image={**cfg, "reduction": reduction}, image_model="tps_vit"),
                      img_load_kw=dict(dont_load=[".*score_head.*"]))
  arrays.update({f"loaded:{k}": v for k, v in flat(loaded["img"]).items()})
  arrays.update({f"init:{k}": v for k, v in flat(init["img"]).items() if "score_head" in k})
  np.savez(out_path, config=np.asarray(json.dumps(cfg)),
           **{f"input:{i}": np.asarray(x) for i, x in enumerate(inputs)}, **arrays)
  print(f"wrote {out_path}: "
        f"{sorted(k for k in arrays if not k.startswith(('param:', 'loaded:', 'init:')))}")


class _Config(dict):
  """big_vision passes ml_collections ConfigDicts: attribute access and `.get`."""
  __getattr__ = dict.__getitem__


if __name__ == "__main__":
  main()
