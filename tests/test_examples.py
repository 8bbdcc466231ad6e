"""The README's demo and the op benchmark run, on real data and small shapes."""

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import custom_method  # noqa: E402
import squeeze_fashion_mnist as demo  # noqa: E402
from benchmarks import ops as ops_bench  # noqa: E402
from tps_jax.data import fashion_mnist  # noqa: E402


@pytest.fixture(scope="module")
def images():
  im, _ = fashion_mnist.load("test")
  return (jnp.asarray(im[:64], jnp.float32) / 255.0 - demo.MEAN) / demo.STD


def test_demo_squeezing_keeps_more_of_the_image_than_pruning(images):
  truth = demo.patchify(images, 4)
  err = {}
  for method in ("prune", "evit", "tome", "tps"):
    rebuilt = jax.jit(lambda im, m=method: demo.reconstruct(im, 24, m, 4))(images)
    assert rebuilt.shape == truth.shape
    err[method] = float(jnp.mean((rebuilt - truth) ** 2))
  assert err["tps"] < 0.5 * err["prune"], err
  assert err["tps"] < err["evit"], err


def test_demo_main_prints_table(capsys):
  demo.main(["--images", "32", "--keep", "0.5"])
  out = capsys.readouterr().out
  assert "tps vs prune" in out and "0.5" in out


def test_ops_benchmark_writes_json(tmp_path, capsys):
  out = tmp_path / "ops.json"
  ops_bench.main(["--batch", "2", "--tokens", "16", "--width", "32", "--heads", "2",
                  "--keep", "10", "--repeats", "1", "--out", str(out)])
  rows = {r["op"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"block", "topk", "evit", "tome", "tps", "tps_masked"}
  assert all(r["median_s"] > 0 for r in rows.values())
  assert "pct_of_block" in capsys.readouterr().out


def test_inference_benchmark_rows_options_and_append(tmp_path, capsys):
  from benchmarks import throughput
  assert throughput.parse_option("a=true") == ("a", True)
  assert throughput.parse_option("b=3") == ("b", 3) and throughput.parse_option("c=x") == ("c", "x")
  with pytest.raises(Exception, match="name=value"):
    throughput.parse_option("novalue")
  # An earlier run's plain dense row (as --append finds it), then one compiled with an option:
  # kept beside the plain one, never as the baseline (this test compiles one row, not two).
  from benchmarks import common as bench
  out = tmp_path / "tp.json"
  plain = {"impl": "tps_jax", "model": "Ti/16", "batch": 2, "dtype": "float32",
           "method": "none", "gmacs": 0.1, "img_per_s": 100.0, "ms_per_batch": 20.0}
  out.write_text(json.dumps({"machine": bench.machine(), "rows": [plain]}))
  throughput.main(["--models", "Ti/16", "--batches", "2", "--dtypes", "float32",
                   "--image-size", "32", "--repeats", "1", "--no-timm", "--out", str(out),
                   "--methods", "none", "--append",
                   "--xla_option", "xla_backend_optimization_level=0",
                   "--param_dtype", "bfloat16", "--model_kw", "gelu=tanh"])
  rows = json.loads(out.read_text())["rows"]
  assert [r.get("xla_options", "") for r in rows] == ["", "xla_backend_optimization_level=0"]
  assert rows[1]["param_dtype"] == "bfloat16" and rows[1]["model_kw"] == "gelu=tanh"
  assert rows[0]["speedup_vs_dense"] == 1.0
  assert rows[1]["speedup_vs_dense"] == pytest.approx(rows[1]["img_per_s"] / 100.0)
  assert rows[1]["img_per_s"] > 0 and rows[1]["gmacs"] > 0
  assert "xla_options" in capsys.readouterr().out


def test_inference_benchmark_times_timm_names_and_hub_directories(tmp_path):
  """--models takes a timm name or a Hub directory; each method runs at its example scaled to
  that model (here DINOv2 with registers, shrunk by --model_kw to compile fast)."""
  from benchmarks import throughput
  small = dict(width=32, depth=2, num_heads=2, mlp_dim=64)
  row = throughput.run("timm:vit_small_patch14_reg4_dinov2", 1, "float32", "tome", 1, 56,
                       model_kw=small)
  dense = throughput.run("timm:vit_small_patch14_reg4_dinov2", 1, "float32", "none", 1, 56,
                         model_kw=small)
  assert 0 < row["gmacs"] < dense["gmacs"] and "width=32" in row["model_kw"]
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "dinov2_with_registers"}))
  fields = throughput.model_fields(f"hub:{tmp_path}")
  assert (fields["num_registers"], fields["patch_size"]) == (4, 16) and "image_size" not in fields
  with pytest.raises(ValueError, match="unknown timm ViT name"):
    throughput.main(["--models", "timm:resnet50", "--no-timm", "--methods", "none"])


def test_inference_reference_rows_compare_to_timm_and_plain_dense_only():
  from benchmarks import big_vision_inference, throughput
  row = lambda impl, rate, **kw: {"impl": impl, "model": "S/16", "batch": 8,
                                  "dtype": "bfloat16", "method": "none", "img_per_s": rate, **kw}
  rows = [row("timm + torch.compile (autocast)", 200.0), row("big_vision (f32_params)", 400.0),
          row("tps_jax", 150.0, param_dtype="bfloat16"), row("tps_jax", 120.0,
                                                                model_kw="gelu=tanh"),
          row("tps_jax", 100.0), row("tps_jax", 300.0, method="dtps")]
  throughput._compare(rows)  # pylint: disable=protected-access
  # big_vision is a JAX anchor, not timm; a row made differently is not the dense baseline.
  assert [r["vs_timm"] for r in rows] == [1.0, 2.0, 0.75, 0.6, 0.5, 1.5]
  assert [r["speedup_vs_dense"] for r in rows] == [2.0, 4.0, 1.5, 1.2, 1.0, 3.0]
  assert len({throughput._key(r) for r in rows}) == 6  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match="no big_vision checkout"):
    big_vision_inference.import_vit(pathlib.Path("/nonexistent"))


FAKE_BIG_VISION = """
from big_vision import utils  # the stubbed module
import flax.linen as nn
import jax.numpy as jnp

class _Model(nn.Module):
  num_classes: int
  dtype_mm: str = "float32"

  @nn.compact
  def __call__(self, image):
    return nn.Dense(self.num_classes, dtype=self.dtype_mm)(jnp.mean(image, (1, 2))), {}

def Model(num_classes=None, *, variant=None, **kw):
  return _Model(num_classes, dtype_mm=kw["dtype_mm"])
"""


@pytest.fixture
def no_big_vision_modules():
  """Removes the `big_vision` modules an import of a checkout leaves, after the test."""
  yield
  for name in [m for m in sys.modules if m == "big_vision" or m.startswith("big_vision.")]:
    del sys.modules[name]


def test_big_vision_reference_rows_from_a_checkout(tmp_path, no_big_vision_modules):
  from benchmarks import big_vision_inference
  (tmp_path / "big_vision" / "models").mkdir(parents=True)
  (tmp_path / "big_vision" / "models" / "vit.py").write_text(FAKE_BIG_VISION)
  (tmp_path / "COMMIT").write_text("google-research/big_vision abc123 2025-05-19\n")
  bv = big_vision_inference.import_vit(tmp_path)
  rows = big_vision_inference.rows(bv, "S/16", batch=2, repeats=1, image_size=8)
  assert [r["impl"] for r in rows] == ["big_vision (f32_params)", "big_vision (bf16_params)"]
  assert all(r["img_per_s"] > 0 and r["params_m"] == 4000 / 1e6 for r in rows)  # 3 x 1000 + 1000
  assert big_vision_inference.provenance(tmp_path)["big_vision"].endswith("abc123 2025-05-19")
  with pytest.raises(ValueError, match="unknown forms"):
    big_vision_inference.rows(bv, "S/16", batch=2, repeats=1, forms=("f16_params",))


def test_custom_method_example_runs_on_a_deit_and_a_big_vision_gap_model(capsys):
  # Smaller than the script's 224 px, 12 blocks (which compile 2x longer): 36 patches, 6 blocks.
  rows = custom_method.main(image_size=96, at=1, depth=6)
  assert [r["tokens"] for r in rows] == [37, 19, 36, 18]  # half the patches kept at block 1
  assert all(r["finite"] for r in rows)
  assert rows[1]["gmacs"] < 0.7 * rows[0]["gmacs"] and rows[3]["gmacs"] < 0.7 * rows[2]["gmacs"]
  assert "norm_keep" in capsys.readouterr().out


def test_a_method_outside_the_package_trains_and_is_benchmarked_by_its_file(tmp_path):
  """examples/custom_method.py named by its path: the config takes it (at its example, its own
  option overridden as a config field), the trainer trains and evaluates it, and the throughput
  benchmark times it; a bad name fails before anything runs."""
  from benchmarks import throughput  # pylint: disable=g-import-not-at-top
  from configs import fashion_mnist as recipe  # pylint: disable=g-import-not-at-top
  from tps_jax import flops  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import build_model  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import loop  # pylint: disable=g-import-not-at-top
  path = str(ROOT / "examples" / "custom_method.py")
  config = recipe.get_config(f"tiny,steps=2,devices=1,method={path}")
  assert config.model.reduction.to_dict() == {"method": path, "keep_ratio": 0.5}
  config.model.reduction.keep_ratio = 0.25  # as --config.model.reduction.keep_ratio=0.25
  config.tensorboard = False
  summary = loop.train_and_evaluate(config, tmp_path / "run")
  assert summary["method"] == path and summary["step"] == 2
  model = build_model(config.model, 10)
  assert model.plan().options.keep == 12  # a quarter of 49 patches
  assert summary["gmacs"] == flops.macs(model) / 1e9
  out = tmp_path / "tp.json"
  throughput.main(["--models", "Ti/16", "--batches", "2", "--dtypes", "float32",
                   "--image-size", "64", "--repeats", "1", "--no-timm", "--out", str(out),
                   "--methods", "none", path])
  rows = json.loads(out.read_text())["rows"]
  assert [r["method"] for r in rows] == ["none", path] and rows[1]["gmacs"] < rows[0]["gmacs"]
  with pytest.raises(ValueError, match="unknown reduction method 'no_such_method'"):
    throughput.main(["--methods", "no_such_method", "--out", str(out)])


def test_a_method_written_from_the_docs_squeezes_some_images_and_drops_for_others():
  """examples/adaptive_squeeze.py (outside the package; it meets the contract too, conftest):
  one static shape, and per image the logits and sizes of either its all-drop or its
  all-squeeze run, both kinds in one batch."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tps_jax.models.vit import Model  # pylint: disable=g-import-not-at-top
  images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  runs = {}
  for mass in (0.0, 0.6, 2.0):  # 0: every image drops; 2: every image squeezes
    model = Model(5, width=48, depth=4, num_heads=3, mlp_dim=96, patch_size=8, image_size=32,
                  pool_type="gap", layout="big_vision",
                  reduction=dict(method=str(ROOT / "examples" / "adaptive_squeeze.py"),
                                 keep_ratio=0.5, keep_mass=mass, at=1))
    params = jax.jit(model.init)(jax.random.key(0), images)
    logits, out = jax.jit(model.apply)(params, images)
    runs[mass] = np.asarray(logits), np.asarray(out["sizes"]).sum(-1)
  (drop, drop_sizes), (mix, mix_sizes), (squeeze, squeeze_sizes) = runs.values()
  np.testing.assert_allclose(drop_sizes, 8)
  np.testing.assert_allclose(squeeze_sizes, 16)
  dropped = mix_sizes < 16
  assert dropped.any() and not dropped.all(), mix_sizes
  np.testing.assert_allclose(mix[dropped], drop[dropped], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mix[~dropped], squeeze[~dropped], rtol=1e-5, atol=1e-6)
