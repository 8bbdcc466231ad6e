"""The README's demo and the op benchmark run, on real data and small shapes."""

import json
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
                   "--xla_option", "xla_backend_optimization_level=0"])
  rows = json.loads(out.read_text())["rows"]
  assert [r.get("xla_options", "") for r in rows] == ["", "xla_backend_optimization_level=0"]
  assert rows[0]["speedup_vs_dense"] == 1.0
  assert rows[1]["speedup_vs_dense"] == pytest.approx(rows[1]["img_per_s"] / 100.0)
  assert rows[1]["img_per_s"] > 0 and rows[1]["gmacs"] > 0
  assert "xla_options" in capsys.readouterr().out


def test_custom_method_example_runs_on_a_deit_and_a_big_vision_gap_model(capsys):
  rows = custom_method.main()
  assert [r["tokens"] for r in rows] == [197, 99, 196, 98]  # half the patches kept at block 4
  assert all(r["finite"] for r in rows)
  assert rows[1]["gmacs"] < 0.7 * rows[0]["gmacs"] and rows[3]["gmacs"] < 0.7 * rows[2]["gmacs"]
  assert "norm_keep" in capsys.readouterr().out
