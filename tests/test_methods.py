"""The contract every registered reduction method meets, written once: a method registered in
`tps_jax.methods` gets these tests without writing them. Each method's own tests (its authors'
goldens) live in its own file.

- it compiles once under jit and leaves the tokens its `tokens()` declares;
- its `identity` spec (keep 1.0, r = 0) gives the dense logits on cls, GAP, MAP, pool "0",
  pool "none" (every token, in order) and scanned models, at inference and (training-free
  methods) in the training forward;
- its `example` runs on cls-free models with fewer tokens at the end; per image, each token's
  size is the number of patches that ended in it (so a method may drop for some images and
  merge for others);
- its MACs equal the traced program's matrix products (and XLA's count within 3-20% more);
- its gradients are finite, and equal under remat, with only the embedding and the head
  outside the rematerialised blocks.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONTRACT_METHODS
from tps_jax import flops, methods
from tps_jax.models import vit
from tps_jax.models.vit import Model

SMALL = dict(width=48, depth=4, num_heads=3, mlp_dim=96, patch_size=8, image_size=32)  # 16 patches
# Every registered method and examples/custom_method.py (registered from outside the package),
# or those given with --method (conftest.py).
NAMES = tuple(CONTRACT_METHODS)
REDUCING = tuple(n for n in NAMES if methods.get(n).reduces)
LAYOUTS = {"tok": dict(pool_type="tok"), "gap": dict(pool_type="gap", layout="big_vision"),
           "map": dict(pool_type="map", layout="big_vision", scan=True),
           "zero": dict(pool_type="0", layout="big_vision"),
           "gap_scan": dict(pool_type="gap", layout="big_vision", scan=True),
           # every token is the output (a PaliGemma prefix): identity must keep their order
           "none": dict(pool_type="none", layout="big_vision")}
# Layouts whose tokens carry sizes, checked patch by patch after each method's example; with
# registers without cls and MAE's cls pooled out (test_timm_families.py runs every method on
# the timm families' layouts: cls and registers, MAE's, SigLIP's).
POOLED = {"gap": LAYOUTS["gap"], "map": LAYOUTS["map"],
          "reg_gap": dict(pool_type="gap", layout="big_vision", num_registers=2),
          "mae": dict(pool_type="gap", class_token=True, fc_norm=True)}
_KW = {**LAYOUTS, **POOLED}
_DENSE = {}


def _images(b=2, size=32, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


def _geometry(model):
  return model.plan().geometry


def _spec(name, layout, kind):
  """The method's `example` or `identity` spec for the small model of `layout`."""
  probe = Model(5, **SMALL, **_KW[layout])
  geo = methods.Geometry(probe.depth, probe.num_reducible, probe.num_prefix, probe.has_cls,
                         probe.has_probe)
  return getattr(methods.get(name), kind)(geo)


def _dense(layout):
  """The dense model's parameters (a non-zero head) and logits, once per layout."""
  if layout not in _DENSE:
    model = Model(5, **SMALL, **_KW[layout])
    params = jax.jit(model.init)(jax.random.key(0), _images())["params"]
    params = jax.tree.map(lambda a: a if a.any() else 0.3 * jax.random.normal(
        jax.random.key(5), a.shape), params)
    logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, _images())
    _DENSE[layout] = params, np.asarray(logits), out
  return _DENSE[layout]


def _params_for(model, params):
  """Dense parameters plus seeded parameters for whatever the method adds (score heads)."""
  init = jax.eval_shape(lambda: model.init(jax.random.key(3), _images())["params"])
  extra = {k: v for k, v in init["Transformer"].items() if k not in params["Transformer"]}
  rng = np.random.default_rng(3)
  extra = jax.tree.map(lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), extra)
  return {**params, "Transformer": {**params["Transformer"], **extra}}


def test_the_registry_lists_every_method_and_names_bad_ones():
  assert methods.names()[:10] == ("none", "dtps", "etps", "dynamicvit", "evit", "topk", "tome",
                                  "pitome", "mctf", "diffrate")
  assert methods.learned() == ("dtps", "dynamicvit")
  with pytest.raises(ValueError, match="unknown reduction method 'prune'; expected one of"):
    methods.get("prune")
  with pytest.raises(ValueError, match="'tome' is already registered"):
    methods.register("tome")(type("Again", (methods.Method,), {}))
  with pytest.raises(TypeError, match="decorates a tps_jax.methods.Method subclass"):
    methods.register("not_a_method")(dict)


@pytest.mark.parametrize("name", NAMES)
def test_compiles_once_and_leaves_the_declared_tokens(name):
  model = Model(5, reduction=_spec(name, "tok", "example"), **SMALL)
  params = _params_for(model, _dense("tok")[0])
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(p, x):
    return model.apply({"params": p}, x, train=False)

  for seed in range(3):
    logits, out = forward(params, _images(seed=seed))
  red = model.reduction
  tokens = model.tokens()
  chex.assert_shape(out["encoded"], (2, tokens[-1][2], SMALL["width"]))
  assert np.isfinite(np.asarray(logits)).all()
  assert len(out["decisions"]) == len(out["hosts"]) == len(model.stage_blocks())
  assert model.tokens_per_block() == tuple(t[1] for t in tokens)
  # Declared counts (optional) equal what the blocks run on: the attention, the MLP, the rest.
  assert vit.traced_plan(model) == (tokens, model.stage_blocks())
  if red.impl.reduces:
    assert tokens[-1][2] < tokens[0][0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", REDUCING)
def test_identity_equals_dense(name, layout):
  """Keep 1.0 / r = 0: tokens are at most reordered, which pooling and attention do not see."""
  params, dense_logits, _ = _dense(layout)
  model = Model(5, reduction=_spec(name, layout, "identity"), **SMALL, **LAYOUTS[layout])
  params = _params_for(model, params)
  logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, _images())
  np.testing.assert_allclose(logits, dense_logits, rtol=1e-4, atol=1e-5)
  if not methods.get(name).learned and layout == "tok":  # learned decisions are sampled
    logits, _ = jax.jit(lambda p, x: model.apply({"params": p}, x, train=True))(params,
                                                                                 _images())
    np.testing.assert_allclose(logits, dense_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", list(POOLED))
@pytest.mark.parametrize("name", REDUCING)
def test_reduces_pooled_models_and_each_token_stands_for_the_patches_it_holds(name, layout):
  """Per image (a method may drop for some images and merge for others): each final patch
  token's size is the number of patches that ended in it, and the patches no token holds are
  the ones dropped; so an image whose patches all ended in some token has tokens standing for
  all 16. The protected tokens (cls, registers) hold no patch and stay first, unmerged."""
  params, _, dense_out = _dense(layout)
  model = Model(5, reduction=_spec(name, layout, "example"), outputs_2d=True, **SMALL,
                **_KW[layout])
  logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x))(
      _params_for(model, params), _images())
  assert np.isfinite(np.asarray(logits)).all()
  assert out["encoded"].shape[1] < dense_out["encoded"].shape[1]
  sizes, owner = np.asarray(out["sizes"]), np.asarray(out["patch_token"])  # (B, T), (B, 16)
  p = model.num_prefix
  held = np.stack([np.bincount(o[o >= 0], minlength=sizes.shape[1]) for o in owner])
  assert (held[:, :p] == 0).all()  # no patch ended in a protected token
  np.testing.assert_allclose(sizes[:, :p], 1.0)
  sizes, held = sizes[:, p:], held[:, p:]
  assert held.sum() < owner.size or (held > 1).any()  # something was dropped or merged
  if np.allclose(sizes, np.round(sizes), atol=1e-5):  # sizes count patches
    np.testing.assert_allclose(sizes, held, rtol=1e-5, atol=1e-5)
  else:  # sizes weighted by similarity (DiffRate's): at most the patches held
    assert (sizes <= held + 1e-5).all() and (sizes[held == 0] == 0).all(), (sizes, held)


FMNIST = dict(width=96, depth=8, num_heads=3, mlp_dim=384, patch_size=4, image_size=28,
              channels=1)  # the study's geometry (49 patches), where the embedding matters most


@pytest.mark.parametrize("name", NAMES)
def test_macs_equal_the_traced_matmuls_and_xla(name):
  probe = Model(10, **FMNIST)
  m = Model(10, reduction=methods.get(name).example(_geometry(probe)), **FMNIST)
  ours = flops.macs(m)
  image = jnp.zeros((1, 28, 28, 1))
  params = jax.eval_shape(lambda: m.init(jax.random.key(0), image))  # one trace for both
  assert ours == pytest.approx(flops.matmul_macs(m, params), rel=0.001)
  # XLA's count adds the elementwise work (softmax, GELU, LayerNorm): 3 to 20% more. The
  # lowered program's count (no compile; within 1.1% of the compiled one, test_flops).
  assert 1.03 < flops.xla_macs(m, params, optimized=False) / ours < 1.2


def _loss_and_params(name, remat):
  # 64 patches, 4 heads, a stage at every block: activations dominate what the backward keeps.
  cfg = dict(SMALL, width=32, depth=2, num_heads=4, mlp_dim=64, patch_size=4)
  probe = Model(5, **cfg)
  model = Model(5, reduction=methods.get(name).example(_geometry(probe)), remat=remat,
                drop_path=0.2, **cfg)
  x = _images(b=4)
  rngs = {"params": jax.random.key(0), "gumbel": jax.random.key(1), "dropout": jax.random.key(2)}
  params = jax.jit(lambda r: model.init(r, x, train=True))(rngs)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x, train=True, rngs=rngs)[0] ** 2)
  return loss, params


@pytest.mark.parametrize("name", NAMES)
def test_gradients_are_finite_and_equal_under_remat(name):
  (loss, params), (loss_r, _) = (_loss_and_params(name, r) for r in (False, True))
  grad, grad_r = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(loss_r))(params)
  chex.assert_tree_all_finite(grad)
  chex.assert_trees_all_close(grad_r, grad, rtol=1e-4, atol=1e-4)  # float32 recompute order
  # Only the patch embedding and the classifier head stay outside the rematerialised blocks
  # and stages (a block left out would keep its attention and MLP for the backward pass).
  top = [e.primitive.name for e in jax.make_jaxpr(loss_r)(params).jaxpr.eqns]
  assert top.count("dot_general") == 2

  def residual_bytes(f):  # what the forward keeps for the backward (shapes only, no compile)
    vjp = jax.eval_shape(lambda p: jax.vjp(f, p)[1], params)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(vjp))

  assert residual_bytes(loss_r) < 0.5 * residual_bytes(loss)


# --- Naming a method: a registered name, or a module reference imported on first use ---------

_MINE = '''
import dataclasses
from tps_jax import methods

@dataclasses.dataclass(frozen=True)
class Opts:
  keep: float

@methods.register("{name}")
class {cls}(methods.Method):
  Options = Opts
  def options(self, spec, geo):
    methods.check_keys(self.name, spec, ("keep",))
    return Opts(float(spec.get("keep", 1.0)))
'''


@pytest.fixture
def registry_snapshot():
  """Methods registered by a test are forgotten after it (the registry is process-wide)."""
  reg = methods.registry
  saved = dict(reg._METHODS), dict(reg._REFERENCES)  # pylint: disable=protected-access
  yield reg
  reg._METHODS.clear(), reg._METHODS.update(saved[0])  # pylint: disable=protected-access
  reg._REFERENCES.clear(), reg._REFERENCES.update(saved[1])  # pylint: disable=protected-access


def test_a_method_is_named_by_a_module_path_or_a_file(registry_snapshot, tmp_path, monkeypatch):
  pkg = tmp_path / "lab_pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "mine.py").write_text(_MINE.format(name="lab_mine", cls="LabMine"))
  (pkg / "two.py").write_text(_MINE.format(name="lab_a", cls="LabA")
                              + _MINE.format(name="lab_b", cls="LabB").split("\n", 3)[-1])
  (pkg / "empty.py").write_text("X = 1\n")
  (pkg / "broken.py").write_text("import lab_dependency_that_is_missing\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert "lab_mine" not in methods.names()
  assert methods.get("lab_pkg.mine").name == "lab_mine"  # imported on first use
  assert "lab_mine" in methods.names() and methods.get("lab_pkg.mine:LabMine").name == "lab_mine"
  # A spec names it the same way; the Reduction keeps the name as given (a fresh process
  # resolves it again).
  red = Model(5, reduction={"method": "lab_pkg.mine", "keep": 0.5}, **SMALL).plan()
  assert red.method == "lab_pkg.mine" and red.impl.name == "lab_mine" and red.options.keep == 0.5
  # Several methods in one module: name one, by its registered or class name.
  with pytest.raises(ValueError, match=r"registers \['lab_a', 'lab_b'\]; name one, e.g. "
                                       r"'lab_pkg.two:lab_a'"):
    methods.get("lab_pkg.two")
  assert methods.get("lab_pkg.two:LabB").name == methods.get("lab_pkg.two:lab_b").name == "lab_b"
  with pytest.raises(ValueError, match="registers no method 'LabC'"):
    methods.get("lab_pkg.two:LabC")
  with pytest.raises(ValueError, match="module 'lab_pkg.empty' registers no method"):
    methods.get("lab_pkg.empty")
  with pytest.raises(ValueError, match=r"no module 'lab_pkg.absent' on the Python path \("):
    methods.get("lab_pkg.absent")
  with pytest.raises(ModuleNotFoundError, match="lab_dependency_that_is_missing"):
    methods.get("lab_pkg.broken")  # the module's own missing import is not hidden
  # A file outside any package, by path.
  (tmp_path / "loose.py").write_text(_MINE.format(name="lab_loose", cls="Loose"))
  assert methods.get(str(tmp_path / "loose.py")).name == "lab_loose"
  assert methods.get(f"{tmp_path / 'loose.py'}:Loose").name == "lab_loose"  # imported once
  with pytest.raises(ValueError, match="no file .*nowhere.py"):
    methods.get(str(tmp_path / "nowhere.py"))
  with pytest.raises(ValueError, match="'lab_mine' is already registered"):
    methods.register("lab_mine")(type("Other", (methods.Method,), {}))


def test_the_contract_suite_runs_on_a_method_given_on_the_command_line():
  """`pytest tests/test_methods.py --method <name or module>` runs the contract on that method
  alone; a bad one is a usage error that names it."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from conftest import CUSTOM_EXAMPLE, ROOT  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
         "tests/test_methods.py"]
  out = subprocess.run(cmd + ["--method", CUSTOM_EXAMPLE], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  ids = [l for l in out.stdout.splitlines() if "::" in l]
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
  assert any("[norm_keep]" in i for i in ids) and any("[norm_keep-" in i for i in ids), ids
  assert not any("tome" in i for i in ids), ids
  bad = subprocess.run(cmd + ["--method", "no_such_pkg.mine"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 4 and "no module 'no_such_pkg.mine'" in bad.stderr, bad.stderr[-2000:]


def test_a_method_composed_from_the_block_primitives_equals_the_built_in(registry_snapshot):
  """Top-k written from the primitives alone (q, k, v; the cls row from `ops.attention_row`;
  the attention and its output projection) gives the built-in top-k's logits and gradients,
  whole and rematerialised: the block's compositions are nothing but the primitives."""
  from tps_jax import ops  # pylint: disable=g-import-not-at-top
  from tps_jax.methods import stages, topk  # pylint: disable=g-import-not-at-top

  @methods.register("lab_primitive_topk")
  class PrimitiveTopK(topk.TopK):  # pylint: disable=unused-variable
    def block(self, o, i, block, state, ctx):
      q, k, v = block.qkv(state.x)
      y = block.residual(state.x, block.attention(q, k, v))
      score = jnp.mean(ops.attention_row(q[:, 0], k), axis=1)[:, ctx.prefix:]
      st = stages.prune_by_scores(y, score, state.positions, o.keep_counts[
          o.locations.index(i)], method="drop", num_patches=ctx.num_patches, prefix=ctx.prefix)
      state = state.after_stage(st, ctx)
      return state.replace(x=block.feed(state.x))

  params, _, _ = _dense("tok")
  spec = dict(keep_ratio=0.5, locations=(1, 2))
  results = []
  for name in ("topk", "lab_primitive_topk"):
    for remat in (False, True):
      model = Model(5, **SMALL, **LAYOUTS["tok"], remat=remat,
                    reduction=dict(method=name, **spec))
      loss = lambda p, m=model: jnp.sum(m.apply({"params": p}, _images())[0] ** 2)
      results.append((jax.jit(loss)(params), jax.jit(jax.grad(loss))(params)))
      assert model.tokens() == Model(5, **SMALL, **LAYOUTS["tok"],
                                     reduction=dict(method="topk", **spec)).tokens()
  for got in results[1:]:
    chex.assert_trees_all_close(got, results[0], rtol=1e-5, atol=1e-5)
