"""Command-line programs name bad input in one line (`error: ...`, exit 2); the traceback only
when asked for (--traceback or TPS_TRACEBACK=1)."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from tps_jax import cli

FMNIST = "configs/fashion_mnist.py"
CASES = [
    ([f"{FMNIST}:method=dtps,keep=1.5"], "keep_ratio must be in (0, 1], got 1.5."),
    ([f"{FMNIST}:method=prune"], "unknown reduction method 'prune'"),
    ([f"{FMNIST}:method=dtps,init=/no/such/teacher.npz"], "/no/such/teacher.npz does not exist"),
    ([FMNIST, "--config.input.dataset=folder", "--config.input.data_dir=/no/such/images"],
     "/no/such/images"),
    ([f"{FMNIST}:method=no_such_pkg.mine"], "no module 'no_such_pkg.mine' on the Python path"),
    ([f"{FMNIST}:method=etps", "--config.model.reduction.threshold=3"],
     "--config.model.reduction.threshold: the config has no field 'threshold'"),
    (["configs/imagenet.py:hub=/no/such/hub"], "/no/such/hub holds no config.json naming"),
    (["configs/imagenet.py:hub=/no/such/hub", "--config.input.batch_size=8"],
     "/no/such/hub holds no config.json naming"),
]


def _train(config, *extra, env=None):
  cmd = [sys.executable, "train.py", "--config", *config[:1], "--workdir", "/tmp/tps_cli_run",
         *config[1:], *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


@pytest.mark.parametrize("config,expected", CASES, ids=["keep", "method", "init", "data_dir",
                                                  "module", "field", "hub", "hub_override"])
def test_train_names_bad_input_in_one_line(config, expected):
  out = _train(config)
  lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith(("W", "I"))]
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines


def test_a_foreign_npz_as_init_is_named_in_one_line_without_unpickling_advice(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  bad = tmp_path / "teacher.npz"
  np.savez(bad, params=np.array([{"w": 1}], dtype=object))
  out = _train([f"{FMNIST}:method=dtps,init={bad}"])
  lines = [l for l in out.stderr.splitlines() if l.strip() and not l.startswith(("W", "I"))]
  assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
  assert f"{bad} holds 'params' as pickled Python objects" in lines[0], lines
  assert "allow_pickle" not in out.stderr


def test_the_traceback_when_asked_for():
  out = _train(CASES[0][0], "--traceback")
  assert out.returncode != 0 and "Traceback (most recent call last)" in out.stderr


def test_argparse_programs_and_the_message_of_wrapped_errors(capsys):
  def main(argv):
    import argparse  # pylint: disable=g-import-not-at-top
    p = argparse.ArgumentParser(prog="prog")
    p.add_argument("--n", type=int)
    p.parse_args(argv)
    raise FileNotFoundError("checkpoint x.npz does not exist.")

  with pytest.raises(SystemExit) as stop:
    cli.run(main, ["--n", "two"])
  assert stop.value.code == 2
  assert capsys.readouterr().err == "error: prog: argument --n: invalid int value: 'two'\n"
  with pytest.raises(SystemExit):
    cli.run(main, ["--n", "2"])
  assert capsys.readouterr().err == "error: checkpoint x.npz does not exist.\n"
  with pytest.raises(FileNotFoundError):
    cli.run(main, ["--n", "2", "--traceback"])
  wrapped = ValueError("Error whilst parsing config file:\n\nTraceback (most recent call "
                       "last):\n  File x\nValueError: keep_ratio must be in (0, 1].")
  assert cli.message(wrapped) == "keep_ratio must be in (0, 1]."
  with pytest.raises(RuntimeError):  # not bad input: raised as it is
    cli.run(lambda argv: (_ for _ in ()).throw(RuntimeError("a bug")), [])


def test_every_json_the_library_writes_is_strict_json(tmp_path):
  """NaN and infinities (a method option of inf, a diverged loss, a speed-up without a dense
  row) are written as null: JSON has no such numbers, and strict readers reject them."""
  import json  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from tps_jax import atomic  # pylint: disable=g-import-not-at-top
  from tps_jax.trainer import metrics  # pylint: disable=g-import-not-at-top

  def strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {text}"))

  payload = {"threshold": float("inf"), "loss": np.float32("nan"), "r": np.int64(3),
             "flags": (True, np.bool_(False)), "nested": [{"x": -float("inf")}, 1.5]}
  assert strict(atomic.to_json(payload)) == {"threshold": None, "loss": None, "r": 3,
                                             "flags": [True, False],
                                             "nested": [{"x": None}, 1.5]}
  atomic.write_json(tmp_path / "summary.json", payload)
  assert strict((tmp_path / "summary.json").read_text())["threshold"] is None
  writer = metrics.Writer(tmp_path, 10, tensorboard=False)
  writer.write(1, {"loss": float("nan"), "accuracy": 0.5})
  record = strict((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
  assert record["loss"] is None and record["accuracy"] == 0.5
