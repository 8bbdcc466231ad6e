"""tps_jax.big_vision against big_vision's own ViT, its `load`, and reductions on models
without a cls token (every method on every layout: tests/test_methods.py).

The goldens (tests/goldens/big_vision/) are big_vision's `models/vit.py` run on seeded
parameters and inputs by scripts/big_vision_goldens.py (provenance in its docstring).
"""

import importlib
import json
import pathlib
import subprocess
import sys

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tps_jax import big_vision as bv
from tps_jax import methods

GOLDENS = pathlib.Path(__file__).resolve().parent / "goldens" / "big_vision"
CONFIGS = ("tok_learn", "gap_learn", "map_learn", "zero_sincos", "none_learn", "gap_sincos_rep",
           "map_scan_rep", "tok_scan", "gap_scan")
RTOL = 1e-4  # of the largest magnitude, float32
_flat = lambda tree: flax.traverse_util.flatten_dict(dict(tree), sep="/")
_tree = lambda flat: flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def _golden(name):
  path = GOLDENS / f"{name}.npz"
  if not path.exists():
    pytest.fail(f"golden {path} is missing (scripts/big_vision_goldens.py writes it).")
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def _case(name):
  g = _golden(name)
  cfg = json.loads(str(g["config"]))
  params = _tree({k[len("param:"):]: v for k, v in g.items() if k.startswith("param:")})
  outs = {k[len("out:"):]: v for k, v in g.items() if k.startswith("out:")}
  return cfg, params, g["image"], outs


def _close(ours, ref, what):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs big_vision {ref.shape}"
  err = np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-12)
  assert err < RTOL, f"{what}: {err:.2e} relative to big_vision"


def _apply(model, params, image, **kw):
  return jax.jit(lambda p, x: model.apply({"params": p}, x, **kw))(params, image)


@pytest.mark.parametrize("name", CONFIGS)
def test_equals_big_vision(name):
  cfg, params, image, ref = _case(name)
  model = bv.Model(**cfg)
  # The parameter tree is big_vision's, name for name and shape for shape.
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.asarray(image))["params"])
  assert {k: v.shape for k, v in _flat(init).items()} == \
      {k: np.shape(v) for k, v in _flat(params).items()}
  logits, out = _apply(model, params, image)
  assert set(ref) <= set(out), f"big_vision's outputs {sorted(ref)} vs ours {sorted(out)}"
  for key, value in ref.items():
    _close(out[key], value, f"{name} {key}")
  _close(logits, ref["logits"], f"{name} logits")


def test_tanh_gelu_is_what_matches():
  """The GELU matters: the exact one is 1e-4-level off big_vision (what was wrong before)."""
  cfg, params, image, ref = _case("tok_learn")
  logits, _ = _apply(bv.Model(**cfg, gelu="exact"), params, image)
  err = np.max(np.abs(np.asarray(logits) - ref["logits"])) / np.max(np.abs(ref["logits"]))
  assert err > 10 * RTOL * 1e-2, err
  logits, _ = _apply(bv.Model(**cfg), params, image)
  _close(logits, ref["logits"], "tanh GELU")


@pytest.mark.parametrize("src,dst", [("tok_scan", "tok_learn"), ("tok_learn", "tok_scan")])
def test_load_converts_between_scan_and_python_loop(tmp_path, src, dst):
  """A scan checkpoint loads into a python-loop model and back (big_vision's load)."""
  _, params, image, ref = _case(src)
  path = tmp_path / "ckpt.npz"
  np.savez(path, **_flat(params))
  cfg = json.loads(str(_golden(dst)["config"]))
  model = bv.Model(**cfg)
  init = jax.jit(model.init)(jax.random.key(1), jnp.asarray(image))["params"]
  loaded = bv.load(init, str(path), cfg)
  assert ("encoderblock" in loaded["Transformer"]) == bool(cfg.get("scan"))
  logits, _ = _apply(model, loaded, image)
  _close(logits, ref["logits"], f"{src} -> {dst}")


def test_fix_old_checkpoints_as_big_vision():
  g = _golden("fix_old")
  old = _tree({k[4:]: v for k, v in g.items() if k.startswith("old:")})
  want = {k[6:]: v for k, v in g.items() if k.startswith("fixed:")}
  got = _flat(bv.fix_old_checkpoints(old))
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-6, err_msg=k)


def test_resample_posemb_as_big_vision():
  g = _golden("resample")
  np.testing.assert_allclose(bv.resample_posemb(g["old"], np.zeros((1, 36, 8))), g["new"],
                             rtol=1e-6, atol=1e-6)


def test_load_resamples_merges_and_names_mismatches(tmp_path):
  cfg, params, image, _ = _case("gap_learn")
  path = tmp_path / "ckpt.npz"
  np.savez(path, **{f"params/{k}": v for k, v in _flat(params).items()})
  big = np.zeros((2, 24, 24, 3), np.float32)  # a 6 x 6 grid: the table is resampled
  model = bv.Model(**cfg)
  init = jax.jit(model.init)(jax.random.key(1), big)["params"]
  loaded = bv.load(init, str(path), cfg, dont_load=("head/.*",))
  assert loaded["pos_embedding"].shape == (1, 36, 32)
  np.testing.assert_array_equal(loaded["head"]["kernel"], init["head"]["kernel"])  # kept init
  np.testing.assert_array_equal(loaded["embedding"]["kernel"], params["embedding"]["kernel"])
  # A dTPS model has score heads the checkpoint lacks: named in the error, loadable with
  # dont_load.
  red = dict(method="dtps", keep_ratio=0.5, locations=(1,))
  dmodel = bv.Model(**cfg, reduction=red)
  dinit = jax.jit(dmodel.init)(jax.random.key(1), jnp.asarray(image))["params"]
  with pytest.raises(ValueError, match=r"(?s)not in the checkpoint.* - Transformer/score_head_0"):
    bv.load(dinit, str(path), cfg)
  loaded = bv.load(dinit, str(path), cfg, dont_load=(".*score_head.*",))
  assert "score_head_0" in loaded["Transformer"]
  with pytest.raises(FileNotFoundError, match="does not exist"):
    bv.load(init, str(tmp_path / "nope.npz"), cfg)


def test_subtree_checkpoint_path(tmp_path):
  """"file.npz:img" takes the image tower of a two-tower (SigLIP-style) checkpoint."""
  cfg, params, image, ref = _case("map_learn")
  path = tmp_path / "two_towers.npz"
  np.savez(path, **{f"img/{k}": v for k, v in _flat(params).items()},
           **{"txt/embedding": np.zeros(3)})
  model = bv.Model(**cfg)
  init = jax.jit(model.init)(jax.random.key(1), jnp.asarray(image))["params"]
  logits, _ = _apply(model, bv.load(init, f"{path}:img", cfg), image)
  _close(logits, ref["logits"], "img subtree")


def test_register_makes_it_a_big_vision_model():
  bv.register("tps_vit")
  module = importlib.import_module("big_vision.models.tps_vit")
  assert module is bv and module.Model is bv.Model and module.load is bv.load
  with pytest.raises(ValueError, match="identifier"):
    bv.register("tps-vit")


def test_unknown_field_and_variants():
  with pytest.raises(ValueError, match=r"unknown ViT fields \['pool'\]"):
    bv.Model(10, variant="S/16", pool="gap")
  with pytest.raises(ValueError, match="unknown pool_type"):
    bv.Model(10, variant="S/16", pool_type="avg")
  assert bv.decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304,
                                                num_heads=16, patch_size=(14, 14))
  assert bv.decode_variant("mu")["width"] == 32 and bv.decode_variant("e")["depth"] == 56
  assert bv.Model(10, variant="mu/16", dtype_mm="bfloat16").dtype == jnp.bfloat16


def test_a_tower_built_with_name_as_big_vision_builds_it():
  """big_vision's two_towers / one_tower / paligemma build `Model(**cfg, name="img")` inside
  their own module: the tower's parameters sit under "img" and equal the bare model's."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  cfg = dict(SMALL, reduction=dict(method="etps", keep_ratio=1.0, locations=(1,)))

  class TwoTowers(nn.Module):  # the shape of big_vision's: the tower made in a compact call
    @nn.compact
    def __call__(self, image):
      zimg, out = bv.Model(**cfg, name="img")(image)
      return zimg, out

  outer = TwoTowers()
  params = jax.jit(outer.init)(jax.random.key(0), IMAGE)["params"]
  assert set(params) == {"img"}
  tower = bv.Model(**cfg)
  z, _ = _apply(outer, params, IMAGE)
  ref, _ = _apply(tower, params["img"], IMAGE)
  np.testing.assert_allclose(z, ref, rtol=1e-6, atol=1e-6)
  assert bv.Model(**cfg, name="img").name == "img"


@pytest.mark.parametrize("name", ["two_towers", "one_tower"])
def test_big_vision_two_and_one_tower_build_our_tower_as_their_own(name):
  """big_vision's SigLIP two_towers and CLIPPO one_tower with image_model="tps_vit" (goldens
  from scripts/towers_goldens.py): inside them our tower gave their vit tower's embeddings at
  keep 1.0 (CLIPPO's text-as-image too) and fewer tokens when reducing; their `load` reached
  ours (dTPS score heads kept at init by dont_load). Here our tower, built as they build it,
  recomputes the embeddings."""
  g = _golden(name)
  cfg = json.loads(str(g["config"]))
  params = _tree({k[len("param:"):]: v for k, v in g.items() if k.startswith("param:")})
  inputs = {"zimg": g["input:0"], "ztxt": g.get("input:1")}

  def embed(key, **extra):  # the model's image half: the tower (name="img"), normalised
    tower = bv.Model(num_classes=16, **cfg, **extra, name="img")
    z, out = _apply(tower, params["img"], inputs[key])
    return np.asarray(z) / (np.linalg.norm(z, axis=1, keepdims=True) + 1e-8), out

  etps = dict(reduction=dict(method="etps", keep_ratio=0.5, locations=(1,)))
  for key in [k for k in ("zimg", "ztxt") if f"{k}:vit" in g]:
    np.testing.assert_allclose(embed(key)[0], g[f"{key}:vit"], atol=1e-6)  # their vit tower
    np.testing.assert_allclose(g[f"{key}:tps_keep1"], g[f"{key}:vit"], atol=1e-6)  # ours, inside
    z, out = embed(key, **etps)
    np.testing.assert_allclose(z, g[f"{key}:tps_etps"], atol=1e-6)
    assert out["encoded"].shape[1] == int(g["tokens:tps_etps"]) == 8  # 16 patches, keep 0.5
    assert not np.allclose(g[f"{key}:tps_etps"], g[f"{key}:vit"], atol=1e-3)
  loaded = {k[len("loaded:"):]: v for k, v in g.items() if k.startswith("loaded:")}
  for k, v in _flat(params["img"]).items():
    np.testing.assert_array_equal(loaded[k], v)  # the checkpoint, through their `load`
  heads = [k for k in loaded if "score_head" in k]
  assert heads and all(np.array_equal(loaded[k], g[f"init:{k}"]) for k in heads)


def test_paligemma_prefix_holds_fewer_image_tokens_and_its_llm_runs_on_them():
  """big_vision's PaliGemma with a tiny random Gemma and img_model="tps_vit" (goldens from
  scripts/towers_goldens.py): every token of the pool-"none" tower is the LLM's prefix. At
  keep 1.0 our tower gave its vit tower's prefix and text logits (stages keep the sequence's
  order when the sequence is the output); eTPS at keep 0.5 and VisionZip (5 dominant, 3
  contextual) halve the prefix and the LLM ran on it. Here our tower recomputes the
  prefixes."""
  g = _golden("paligemma")
  cfg = json.loads(str(g["config"]))
  params = _tree({k[len("param:"):]: v for k, v in g.items() if k.startswith("param:")})
  llm_width = params["llm"]["embedder"]["input_embedding"].shape[1]

  def prefix(**extra):
    tower = bv.Model(num_classes=llm_width, **cfg, **extra, name="img")
    return np.asarray(_apply(tower, params["img"], g["image"])[0])

  np.testing.assert_allclose(prefix(), g["zimg:vit"], atol=1e-5)
  np.testing.assert_array_equal(g["zimg:tps_keep1"], g["zimg:vit"])  # the same order
  np.testing.assert_allclose(g["logits:tps_keep1"], g["logits:vit"], atol=1e-6)
  half = prefix(reduction=dict(method="etps", keep_ratio=0.5, locations=(1,)))
  np.testing.assert_allclose(half, g["zimg:tps_etps"], atol=1e-5)
  assert half.shape[1] == int(g["prefix:tps_etps"]) == 8 < int(g["prefix:vit"]) == 16
  assert g["logits:tps_etps"].shape == g["logits:vit"].shape  # the LLM ran on 8 image tokens
  assert np.isfinite(g["logits:tps_etps"]).all()
  # VisionZip reduces the prefix the LLM reads: 5 dominant and 3 contextual tokens.
  zipped = prefix(reduction=dict(method="visionzip", dominant=5, contextual=3))
  np.testing.assert_allclose(zipped, g["zimg:tps_visionzip"], atol=1e-5)
  assert zipped.shape[1] == int(g["prefix:tps_visionzip"]) == 8
  assert np.isfinite(g["logits:tps_visionzip"]).all()
  assert not np.allclose(g["logits:tps_visionzip"], g["logits:tps_etps"], atol=1e-3)


def test_imports_without_the_training_stack():
  """`pip install .` (jax, flax, numpy) is enough for tps_jax.big_vision."""
  code = ("import sys; import tps_jax.big_vision; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & "
          "{'grain', 'tensorflow_datasets', 'orbax', 'optax', 'ml_collections', 'tensorflow'}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert out.stdout.strip() == "[]", out.stdout


# --- every reduction on models without a cls token -------------------------------------------

SMALL = dict(num_classes=5, patch_size=(4, 4), width=32, depth=3, mlp_dim=64, num_heads=2)
IMAGE = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)


def _spec(method, keep):
  if method == "diffrate":  # a per-block schedule (16 patches, 3 blocks)
    return {"method": "diffrate", "prune_kept": [16, 12, 8] if keep < 1 else [16] * 3,
            "merge_kept": [16, 10, 8] if keep < 1 else [16] * 3}
  return methods.get(method).spec(keep_ratio=keep, locations=(1, 2), r=2 if keep < 1 else 0)


LAYOUTS = [("gap", False), ("map", True), ("gap", True), ("map", False)]
_DENSE = {}


def _dense(pool, scan):
  """Dense model, parameters (a non-zero head) and outputs; built once per layout."""
  if (pool, scan) not in _DENSE:
    model = bv.Model(**SMALL, pool_type=pool, scan=scan)
    params = jax.jit(model.init)(jax.random.key(0), IMAGE)["params"]
    # a trained-looking head: the zero-initialised head would make every logit 0
    params = jax.tree.map(lambda a: a if a.any() else 0.3 * jax.random.normal(
        jax.random.key(5), a.shape), params)
    logits, out = _apply(model, params, IMAGE)
    _DENSE[pool, scan] = params, np.asarray(logits), out
  return _DENSE[pool, scan]


def _params_for(model, params):
  """Dense parameters plus fresh score heads where the model has them."""
  init = jax.eval_shape(lambda: model.init(jax.random.key(3), IMAGE)["params"])
  heads = [k for k in init["Transformer"] if "score_head" in k]
  if not heads:
    return params
  rng = np.random.default_rng(3)  # seeded values, no init to compile
  fresh = {k: jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32),
                           init["Transformer"][k]) for k in heads}
  return {**params, "Transformer": {**params["Transformer"], **fresh}}


@pytest.mark.parametrize("pool,scan,method", [("map", True, "dtps"), ("gap", False, "dynamicvit")])
def test_learned_training_form_on_cls_free_models(pool, scan, method):
  """The masked training form runs, and its gradients are finite even where an untrained
  scorer drops every token of an image (weights all 0 in the pooling)."""
  params, _, _ = _dense(pool, scan)
  half = bv.Model(**SMALL, pool_type=pool, scan=scan, reduction=_spec(method, 0.5))
  p = _params_for(half, params)

  def loss(p):
    lg, _ = half.apply({"params": p}, IMAGE, train=True, rngs={"gumbel": jax.random.key(0)})
    return jnp.mean(lg ** 2)
  grads = jax.jit(jax.grad(loss))(p)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_unmerged_2d_outputs_follow_each_patch():
  """After eTPS a pruned patch's cell holds its host's token; after top-k it is zero."""
  for method in ("etps", "topk"):
    model = bv.Model(**SMALL, pool_type="gap", reduction=_spec(method, 0.5))
    params = jax.jit(model.init)(jax.random.key(0), IMAGE)["params"]
    _, out = _apply(model, params, IMAGE)
    cells = np.asarray(out["pre_logits_2d"]).reshape(2, 16, -1)
    owner = np.asarray(out["patch_token"])
    enc = np.asarray(out["encoded"])
    for b in range(2):
      for patch in range(16):
        want = enc[b, owner[b, patch]] if owner[b, patch] >= 0 else np.zeros(enc.shape[-1])
        np.testing.assert_array_equal(cells[b, patch], want)
    dropped = (owner < 0).sum()
    assert (dropped > 0) == (method == "topk"), (method, dropped)


def test_scan_with_stages_equals_python_loop_and_scans_each_segment():
  red = dict(method="etps", keep_ratio=0.5, locations=(2,))
  cfg = dict(SMALL, depth=6, pool_type="map")
  loop_model = bv.Model(**cfg, reduction=red)
  scan_model = bv.Model(**cfg, reduction=red, scan=True)
  params = jax.jit(loop_model.init)(jax.random.key(0), IMAGE)["params"]
  ref, _ = _apply(loop_model, params, IMAGE)
  scanned = bv.pyloop_to_scan(params)
  got, _ = _apply(scan_model, scanned, IMAGE)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # blocks 0-1 and 3-5 are two scans; block 2 (the stage) runs alone.
  jaxpr = jax.make_jaxpr(lambda p, x: scan_model.apply({"params": p}, x))(scanned, IMAGE)
  scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
  assert sorted(e.params["length"] for e in scans) == [2, 3]


def test_cls_score_needs_a_cls_token():
  with pytest.raises(ValueError, match="needs a cls token"):  # at construction: no trace
    bv.Model(**SMALL, pool_type="gap",
             reduction=dict(method="etps", keep_ratio=0.5, locations=(1,), score="cls"))
  with pytest.raises(ValueError, match="unknown reduction score"):
    bv.Model(**SMALL, reduction=dict(method="etps", score="norm"))


def test_map_probe_needs_a_map_head():
  with pytest.raises(ValueError, match="'map_probe' needs a MAP head"):
    bv.Model(**SMALL, pool_type="gap",
             reduction=dict(method="etps", keep_ratio=0.5, locations=(1,), score="map_probe"))
  with pytest.raises(ValueError, match="'map_probe' needs a MAP head"):
    bv.Model(**SMALL, pool_type="tok", reduction=dict(method="topk", score="map_probe"))


def _layer_norm(x, p, eps=1e-6):
  x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
  return x * np.asarray(p["scale"]) + np.asarray(p["bias"])


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("scan", [False, True])
def test_map_probe_keeps_the_tokens_the_map_probe_attends_to(scan):
  """score "map_probe": the MAP head's probe query (probe @ W_q + b_q of `MAPHead_0`)
  against the stage block's keys; a top-k stage at block 1 keeps the tokens with the largest
  head-mean softmax of it, computed here from the parameters alone."""
  red = dict(method="topk", keep_ratio=0.5, locations=(1,), score="map_probe")
  model = bv.Model(**SMALL, pool_type="map", reduction=red)
  params = jax.jit(model.init)(jax.random.key(3), IMAGE)["params"]
  dense = bv.Model(**SMALL, pool_type="map")
  _, inter = dense.apply({"params": params}, IMAGE, capture_intermediates=True,
                         mutable=["intermediates"])
  x = np.asarray(inter["intermediates"]["Transformer"]["encoderblock_0"]["__call__"][0])
  blk, head = params["Transformer"]["encoderblock_1"], params["MAPHead_0"]
  attn = blk["MultiHeadDotProductAttention_0"]
  k = np.einsum("bnd,dhk->bnhk", _layer_norm(x, blk["LayerNorm_0"]),
                attn["key"]["kernel"]) + attn["key"]["bias"]
  mha = head["MultiHeadDotProductAttention_0"]["query"]
  q = np.einsum("d,dhk->hk", np.asarray(head["probe"])[0, 0], mha["kernel"]) + mha["bias"]
  score = _softmax(np.einsum("hk,bnhk->bhn", q, k) / 4.0).mean(1)  # head dim 16
  want = np.sort(np.argsort(-score, axis=1)[:, :8], axis=1)
  if scan:
    model = bv.Model(**SMALL, pool_type="map", reduction=red, scan=True)
    params = bv.pyloop_to_scan(params)
  _, out = _apply(model, params, IMAGE)
  np.testing.assert_array_equal(np.sort(np.asarray(out["keep_indices"][0]), axis=1), want)
  # the test tells the scores apart: the mean query's row keeps other tokens here
  y = _layer_norm(x, blk["LayerNorm_0"])
  mean_q = np.einsum("bnd,dhk->bhk", y, attn["query"]["kernel"]) / y.shape[1] + \
      attn["query"]["bias"]
  by_mean = _softmax(np.einsum("bhk,bnhk->bhn", mean_q, k) / 4.0).mean(1)
  assert not np.array_equal(want, np.sort(np.argsort(-by_mean, axis=1)[:, :8], axis=1))


@pytest.mark.parametrize("method", ["etps", "diffrate"])
def test_map_probe_macs_count_what_runs(method):
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  spec = ({"method": "etps", "keep_ratio": 0.5, "locations": (1,)} if method == "etps" else
          {"method": "diffrate", "prune_kept": [16, 10, 6], "merge_kept": [16, 8, 6]})
  macs = {}
  for score in ("received", "map_probe"):
    m = Model(**SMALL, image_size=16, layout="big_vision", pool_type="map",
              reduction={**spec, "score": score})
    params = jax.eval_shape(lambda m=m: m.init(jax.random.key(0), IMAGE[:1]))
    assert flops.macs(m) == pytest.approx(flops.matmul_macs(m, params), rel=1e-3)
    macs[score] = flops.macs(m)
  assert macs["map_probe"] > macs["received"]  # the probe query's projection


def test_cls_free_scores_are_the_attention_tokens_receive():
  """`received`: column means of the attention matrix; `mean_query`: the attention row of
  the mean query; both per head, against a direct computation from the block's weights."""
  from tps_jax.models.layers import Encoder1DBlock  # pylint: disable=g-import-not-at-top
  block = Encoder1DBlock(64, 2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 9, 32)).astype(np.float32))
  params = block.init(jax.random.key(0), x)["params"]
  _, info = block.apply({"params": params}, x, method=block.attend_matrix)
  ln = params["LayerNorm_0"]
  y = np.asarray(x)
  y = (y - y.mean(-1, keepdims=True)) / np.sqrt(y.var(-1, keepdims=True) + 1e-6)
  y = y * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
  attn_p = params["MultiHeadDotProductAttention_0"]
  proj = lambda n: np.einsum("bnd,dhk->bnhk", y, attn_p[n]["kernel"]) + attn_p[n]["bias"]
  q, k = proj("query"), proj("key")
  softmax = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(
      a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
  attn = softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / 4.0)  # head dim 16
  np.testing.assert_allclose(info.received, attn.mean(2), rtol=1e-4, atol=1e-6)
  mean_row = softmax(np.einsum("bhd,bkhd->bhk", q.mean(1), k) / 4.0)
  np.testing.assert_allclose(info.mean_query, mean_row, rtol=1e-4, atol=1e-6)


def test_both_loaders_convert_once_and_resample_the_table_alike(tmp_path):
  """`load` (big_vision's face) and `from_big_vision` (checked against our model) share one
  conversion: a checkpoint on a 4 x 4 grid loads into a 6 x 6 model through either, with the
  same resampled table and the same weights."""
  from tps_jax import checkpoints  # pylint: disable=g-import-not-at-top
  cfg, params, _, _ = _case("gap_learn")
  path = tmp_path / "ckpt.npz"
  np.savez(path, **{f"params/{k}": v for k, v in _flat(params).items()})
  model = bv.Model(**cfg, image_size=24)
  init = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 24, 24, 3)))["params"]
  via_load = bv.load(init, str(path), cfg)
  via_ours = checkpoints.from_big_vision(str(path), model)
  assert via_ours["pos_embedding"].shape == (1, 36, 32)
  chex.assert_trees_all_close(via_ours, jax.tree.map(np.asarray, via_load))
