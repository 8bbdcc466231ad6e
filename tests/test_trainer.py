"""The trainer: loss goes down, one trace per step, sharding, multi-process, resume, errors."""

import json
import re
import shutil
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from unittest import mock

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, fashion_mnist, imagenet
from conftest import ROOT
from tps_jax import checkpoints as foreign, data, flops
from tps_jax.checkpoints import runs as run_checkpoints
from tps_jax.data import fashion_mnist as fm
from tps_jax.models.vit import build_model
from tps_jax.trainer import loop, sharding, state as state_lib


def _config(arg="tiny", **overrides):
  c = fashion_mnist.get_config(arg)
  c.tensorboard = False
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _batches(run, n, start=0):
  it = data.train_batches(run.source, "train", run.preprocess, local_batch=run.local_batch,
                          seed=run.config.seed, start_step=start)
  return [data.to_global(next(it), run.data_sharding) for _ in range(n)]


def _prepare(config):
  run = loop.Run(config)
  state = run.init_state()
  run.load_teacher()
  run.compile()
  return run, state


def test_steps_lower_the_loss_and_trace_once():
  run, state = _prepare(_config("tiny,method=dtps,batch=64,devices=1",
                                **{"optim.lr": 3e-3, "optim.warmup_epochs": 0.0}))
  step_fn = loop.make_train_step(run.model, run.tx, num_classes=10, mixing=run.mixing,
                                 loss_cfg={}, teacher=None, preprocess=run.preprocess)
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(step_fn, n=1), donate_argnums=0)
  batch = _batches(run, 1)[0]
  losses = []
  for _ in range(25):  # the same batch: the loss must fall
    state, m = step(state, batch, None)
    losses.append(float(m["loss"]))
  assert losses[-1] < 0.8 * losses[0], losses
  assert int(state["step"]) == 25 and all(np.isfinite(losses))


# big_vision's form: named axes, a regex strategy, logical activation rules. The MLP's first
# kernel is split over "model" along its output; the batch over data x fsdp, not "model".
NAMED = dict(mesh=[("data", 2), ("fsdp", 2), ("model", 2)],
             sharding_strategy=[(".*/(bias|scale)", "replicate"),
                                (".*MlpBlock_0/Dense_0/kernel", "shard(dim=-1, axis='model')"),
                                (".*", "fsdp(axis='fsdp', min_size=4096)")],
             sharding_rules=[("act_batch", ("data", "fsdp"))])


def test_eight_devices_data_by_fsdp_match_one_device():
  overrides = {"model.width": 64, "model.mlp_dim": 256, "mesh.min_shard_size": 4096}
  results = {}
  for name, mesh in (("one", dict(data=1, fsdp=1, num_devices=1)),
                     ("eight", dict(data=2, fsdp=4)), ("named", NAMED)):
    config = _config("tiny,method=dtps,batch=32", **overrides)
    if name == "named":
      with config.ignore_type():  # the recipe's mesh is the older dict form
        for key, value in mesh.items():
          config[key] = value
    else:
      config.mesh = {**mesh, "min_shard_size": 4096}
    run, state = _prepare(config)
    for batch in _batches(run, 3):
      state, m = run.train_step(state, batch, None)
    results[name] = (float(m["loss"]), jax.device_get(state["params"]), state, run)
  assert results["one"][0] == pytest.approx(results["eight"][0], rel=1e-5)
  chex.assert_trees_all_close(results["one"][1], results["eight"][1], atol=2e-5, rtol=1e-4)
  # The rules: large kernels split over fsdp (4 ways), small arrays replicated.
  state, run = results["eight"][2], results["eight"][3]
  kernel = state["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert kernel.shape == (64, 256) and kernel.sharding.spec == jax.P(None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 64)}
  bias = state["params"]["head"]["bias"]
  assert bias.sharding.spec == jax.P() and len(bias.sharding.device_set) == 8
  # The optimizer state follows the parameters: every moment of that kernel (AdamW's mu and
  # nu, the same shape) is split over fsdp like it.
  moments = [x for x in jax.tree.leaves(state["opt_state"]) if x.shape == (64, 256)]
  assert len(moments) >= 2 and all(x.sharding.spec == jax.P(None, "fsdp") for x in moments)
  # The named layout trains the same, its strategy by path, its batch over data x fsdp, and
  # the model's activations constrained to it (one constraint per block at least).
  loss, params, state, run = results["named"]
  assert loss == pytest.approx(results["one"][0], rel=1e-5)
  chex.assert_trees_all_close(results["one"][1], params, atol=2e-5, rtol=1e-4)
  block = state["params"]["Transformer"]["encoderblock_0"]
  assert block["MlpBlock_0"]["Dense_0"]["kernel"].sharding.spec == jax.P(None, "model")
  assert block["MlpBlock_0"]["Dense_1"]["kernel"].sharding.spec == jax.P("fsdp")
  assert block["MlpBlock_0"]["Dense_1"]["bias"].sharding.spec == jax.P()
  assert run.data_sharding.spec == jax.P(("data", "fsdp"))
  forward = lambda p, x: run.model.apply({"params": p}, x)
  images = jax.device_put(jnp.zeros((32, 28, 28, 1)), run.data_sharding)
  constraint = "sharding_constraint"  # Shardy's op (sdy.sharding_constraint)
  traced = jax.jit(run.layout.trace(forward)).lower(state["params"], images).as_text()
  assert traced.count(constraint) >= run.model.depth + 1, traced.count(constraint)
  assert re.search(r'sharding_constraint[^\n]*\[\{"data", "fsdp"\}, \{\}, \{\}\]', traced)
  plain = jax.jit(forward).lower(state["params"], images).as_text()
  assert constraint not in plain  # outside a layout the model constrains nothing


def test_rules_and_mesh_errors():
  assert sharding.spec_for((384, 1536), 4) == jax.P(None, "fsdp")
  assert sharding.spec_for((384,), 4) == jax.P()
  assert sharding.spec_for((7, 7777), 4, min_size=1) == jax.P()  # nothing divides
  with pytest.raises(ValueError, match="'fsdp': 3} does not divide the 8 devices"):
    sharding.make_mesh(fsdp=3)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 2), ("model", 2)])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
  for axes, message in (([("data", -1), ("fsdp", -1)], "more than one axis of size -1"),
                        ([("data", 4), ("data", 2)], "names an axis twice"),
                        ([("data", 16)], "does not divide the 8 devices"),
                        ([("data", 2), ("fsdp", 2)], "covers 4 devices, but there are 8"),
                        (["data"], "list of .axis name, size. pairs")):
    with pytest.raises(ValueError, match=message):
      sharding.make_mesh(axes)
  with pytest.raises(ValueError, match="spans 2 slices, but the devices lie in 1"):
    sharding.make_mesh([("data", -1)], dcn=[("data", 2)])
  with pytest.raises(ValueError, match="names axes .'fsdp'. that the mesh .'data'. lacks"):
    sharding.make_mesh([("data", -1)], dcn=[("fsdp", 2)])
  # Strategies: by regex on the path, first match; each bad one named before any step.
  strategy = [(".*bias", "replicate"), (".*emb.*", "shard(dim=-1, axis='model')"),
              (".*", "fsdp(axis=('data', 'fsdp'), min_size=64)")]
  spec = lambda path, shape: sharding.spec_for_path(path, shape, strategy, mesh)
  assert spec("params/head/bias", (64,)) == jax.P()
  assert spec("params/embedding/kernel", (4, 4, 1, 64)) == jax.P(None, None, None, "model")
  assert spec("opt_state/0/mu/head/kernel", (64, 10)) == jax.P(("data", "fsdp"))
  assert spec("params/cls", (1, 1, 6)) == jax.P()  # under min_size
  with pytest.raises(ValueError, match="dim 1 is out of range for its shape .64,."):
    sharding.spec_for_path("params/b", (64,), [(".*", "shard(dim=1, axis='model')")], mesh)
  for text, message in (("split", "unknown sharding strategy 'split'"),
                        ("fsdp(axis=fsdp)", "arguments are key=value literals"),
                        ("shard(axis='model')", "shard needs dim="),
                        ("fsdp(dims=1)", r"fsdp takes \['axis', 'min_size'\], not \['dims'\]")):
    with pytest.raises(ValueError, match=message):
      sharding.parse_strategy(text)
  with pytest.raises(ValueError, match="names axes .'tensor'.; the mesh has"):
    sharding.spec_for_path("params/x", (64, 64), [(".*", "shard(dim=0, axis='tensor')")], mesh)
  for key, value, message in (
      ("sharding_rules", [("act_batch", "tensor")], "maps 'act_batch' to axes .'tensor'."),
      ("sharding_strategy", [("(", "replicate")], r"regex '\(':"),
      ("mesh", {"data": -1, "tensor": 2}, "unknown keys .'tensor'.")):
    config = _config("tiny")
    with config.ignore_type():
      config[key] = value
    with pytest.raises(ValueError, match=message):
      loop.Run(config)
  with pytest.raises(ValueError, match="does not divide over the 8 devices"):
    loop.Run(_config("tiny,batch=12"))
  # The evaluation batch is checked at the start, not at the first evaluation.
  with pytest.raises(ValueError, match="eval_batch_size: global batch size 1001 does not divide"):
    loop.Run(_config("tiny", **{"input.eval_batch_size": 1001}))


def test_config_and_checkpoint_errors(tmp_path):
  with pytest.raises(ValueError, match="unknown config argument 'methd'"):
    fashion_mnist.get_config("methd=dtps")
  with pytest.raises(ValueError, match="unknown reduction method 'pruning'"):
    fashion_mnist.get_config("method=pruning")
  with pytest.raises(ValueError, match="unknown DeiT variant"):
    imagenet.get_config("variant=XL")
  # Values that do not parse as their type are named, never coerced.
  with pytest.raises(ValueError, match="keep='abc' is not a number"):
    fashion_mnist.get_config("keep=abc")
  with pytest.raises(ValueError, match="steps='2.5' is not an integer"):
    fashion_mnist.get_config("steps=2.5")
  with pytest.raises(ValueError, match="tiny='ture' is not a boolean"):
    fashion_mnist.get_config("tiny=ture")
  assert fashion_mnist.get_config("tiny=no,steps=3").total_steps == 3
  # The paper's geometry: 196 tokens (patch 2), stages at blocks 3, 6, 9 of 12.
  paper = fashion_mnist.get_config("patch=2,depth=12,stages=3-6-9,method=etps")
  assert paper.model.patch_size == 2 and tuple(paper.model.reduction["locations"]) == (3, 6, 9)
  with pytest.raises(ValueError, match="stages='6-3': the blocks must increase, each in 0..7"):
    fashion_mnist.get_config("stages=6-3")
  with pytest.raises(ValueError, match="stages='3-x' is not blocks joined by '-'"):
    fashion_mnist.get_config("stages=3-x")
  with pytest.raises(ValueError, match="patch=3 does not divide the 28-pixel images"):
    fashion_mnist.get_config("patch=3")
  with pytest.raises(ValueError, match="batch size must be a positive integer, got 0"):
    loop.Run(_config("tiny", **{"input.batch_size": 0}))
  # Evaluation runs the model as it trains, float32 only when asked.
  assert loop.Run(_config("tiny", mixed_precision=True)).eval_model.dtype == jnp.bfloat16
  assert loop.Run(_config("tiny", mixed_precision=True,
                          eval_precision="float32")).eval_model.dtype == jnp.float32
  with pytest.raises(ValueError, match="unknown config.eval_precision 'half'"):
    loop.Run(_config("tiny", eval_precision="half"))
  # A corrupt params.npz is named as such, not as numpy's "pickled data" complaint.
  (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
  with pytest.raises(foreign.CheckpointCorruptError, match="corrupt.npz is not a readable"):
    loop.Run(_config("tiny", **{"init.checkpoint": str(tmp_path / "corrupt.npz")})).init_state()
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loop.Run(_config("tiny", **{"init.checkpoint": str(tmp_path / "nope.npz")})).init_state()
  # A dense Ti/16 state dict does not fit the tiny model: named mismatches.
  np.savez(tmp_path / "other.npz", **{"cls_token": np.zeros((1, 1, 192), np.float32)})
  with pytest.raises(foreign.CheckpointMismatchError, match="do not fit a model of width 16"):
    loop.Run(_config("tiny", **{"init.checkpoint": str(tmp_path / "other.npz")})).init_state()


def test_train_resume_init_and_mismatch(tmp_path):
  # One device (the sharded paths have their own tests below): a fifth less compiling.
  config = _config("tiny,steps=12,devices=1")
  summary = loop.train_and_evaluate(config, tmp_path / "dense")
  assert summary["step"] == 12 and summary["examples"] == 2000  # tiny: test[:2000]
  # The reported top-1 is that of the exported parameters on the evaluated images (tiny:
  # test[:2000]), computed here without the input pipeline or the eval step.
  model = build_model(config.model, 10)
  params = foreign.load_params(tmp_path / "dense" / "params.npz", model)
  images, labels = (a[:2000] for a in fm.load("test"))
  x = (images[..., None] / 255.0 - 0.286) / 0.353
  logits = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])(params, x)
  assert summary["top1"] == np.mean(np.argmax(logits, -1) == labels)
  assert summary["gmacs"] == flops.macs(model) / 1e9
  lines = [json.loads(l) for l in (tmp_path / "dense" / "metrics.jsonl").read_text().splitlines()]
  assert lines[-1]["kind"] == "final" and any(l["kind"] == "train" for l in lines)
  # Fine-tune dTPS from it (teacher = the same checkpoint, fresh score heads).
  ft = _config(f"tiny,steps=4,method=dtps,init={tmp_path / 'dense'},devices=1")
  out = loop.train_and_evaluate(ft, tmp_path / "dtps")
  assert out["method"] == "dtps" and out["step"] == 4
  record = [json.loads(l) for l in (tmp_path / "dtps" / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in record if r["kind"] == "train"]
  assert all(k in train[-1] for k in ("keep", "kl", "token"))
  # The dense checkpoint cannot resume a dTPS run: a clear mismatch.
  with pytest.raises(foreign.CheckpointMismatchError, match="does not match"):
    loop.train_and_evaluate(_config("tiny,steps=14,method=dtps,devices=1"),
                            tmp_path / "dense")
  # Evaluate entry point on the exported params.
  ev = loop.evaluate(_config("tiny,devices=1"), tmp_path / "dense" / "params.npz")
  assert ev["top1"] == pytest.approx(summary["top1"]) and ev["images_per_s"] > 0
  # Bytes flipped in the latest checkpoint (12): the run says so loudly and resumes from the
  # newest intact one (10) instead of calling it a config change.
  _flip_bytes(tmp_path / "dense" / "checkpoints" / "12")
  messages = []
  with mock.patch.object(loop.metrics_lib.Writer, "message",
                         lambda self, text: messages.append(text)):
    again = loop.train_and_evaluate(_config("tiny,steps=14,devices=1"), tmp_path / "dense")
  assert again["step"] == 14
  assert any("checkpoints/12 is corrupt" in m and "WARNING" in m for m in messages), messages
  assert any(m.endswith("checkpoints/10") for m in messages if m.startswith("resuming")), messages
  assert (tmp_path / "dense" / "checkpoints" / "corrupt-12").is_dir()


def _flip_bytes(step_dir, count=16):
  """Inverts `count` bytes in the middle of the largest file of an Orbax step."""
  biggest = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  raw = bytearray(biggest.read_bytes())
  mid = len(raw) // 2
  raw[mid:mid + count] = bytes(b ^ 0xFF for b in raw[mid:mid + count])
  biggest.write_bytes(bytes(raw))
  return biggest


def test_checkpoints_tell_corruption_from_mismatch(tmp_path):
  state = lambda step: {"step": jnp.asarray(step, jnp.int32),
                        "params": {"w": jnp.arange(4096.0).reshape(64, 64) + step}}
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                          state(0))
  ckpt = state_lib.Checkpoints(tmp_path, keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, state(step))
    if step == 1:  # sealed in the background once Orbax finalises it, not at the next save
      sums = tmp_path / "checkpoints" / "1" / run_checkpoints.CHECKSUMS  #
      deadline = time.time() + 30
      while not sums.exists() and time.time() < deadline:
        time.sleep(0.05)
      assert sums.exists()
  ckpt.close()
  root = tmp_path / "checkpoints"
  assert all((root / str(s) / "tps_jax_sha256.json").exists() for s in (1, 2, 3))
  _flip_bytes(root / "3")  # Orbax alone would restore these bytes as wrong numbers
  # Reading a workdir's params (load_params, --init, --evaluate) takes the newest intact step
  # as restore does, and moves nothing; a named step is read or refused.
  warned = []
  relative = os.path.relpath(tmp_path)  # as `--evaluate runs/x` gives it; Orbax wants absolute
  np.testing.assert_array_equal(run_checkpoints.read_params(relative, warn=warned.append)["w"],
                                state(2)["params"]["w"])
  assert len(warned) == 1 and "checkpoints/3 is corrupt" in warned[0]
  with pytest.raises(foreign.CheckpointCorruptError, match="differ from the checksums"):
    run_checkpoints.read_params(root / "3")
  assert (root / "3").is_dir()
  ckpt = state_lib.Checkpoints(tmp_path, keep=5)
  with pytest.raises(foreign.CheckpointCorruptError, match="differ from the checksums"):
    ckpt.restore(abstract, step=3)  # an explicit step is refused, never replaced
  # Another layout is a mismatch (names the array), not corruption: nothing is set aside.
  other = {**abstract, "params": {"w": jax.ShapeDtypeStruct((32, 64), jnp.float32)}}
  with pytest.raises(foreign.CheckpointMismatchError, match=r"params/w.*\(64, 64\).*\(32, 64\)"):
    ckpt.restore(other, step=2)
  warnings = []
  restored = ckpt.restore(abstract, warn=warnings.append)
  assert int(restored["step"]) == 2
  np.testing.assert_array_equal(restored["params"]["w"], state(2)["params"]["w"])
  assert len(warnings) == 1 and "checkpoints/3 is corrupt" in warnings[0]
  assert (root / "corrupt-3").is_dir() and ckpt.latest_step() == 2
  ckpt.save(3, state(3), wait=True)  # the redone step is saved again, not skipped
  assert int(ckpt.restore(abstract)["step"]) == 3
  ckpt.close()
  # A failure that is not the checkpoint's (memory, the filesystem, Orbax) is raised as it is
  # and moves nothing, though every step would fail alike.
  ckpt = state_lib.Checkpoints(tmp_path, keep=5)
  with mock.patch.object(ckpt.manager, "restore", side_effect=OSError("NFS timed out")):
    with pytest.raises(OSError, match="NFS timed out"):
      ckpt.restore(abstract, warn=warnings.append)
  assert ckpt.latest_step() == 3 and len(warnings) == 1
  assert sorted(p.name for p in root.iterdir()) == ["1", "2", "3", "corrupt-3"]
  ckpt.close()
  # Without checksums (an older checkpoint), unreadable metadata is still corruption.
  for step in (1, 2, 3):
    (root / str(step) / "tps_jax_sha256.json").unlink()
    (root / str(step) / "default" / "_METADATA").write_bytes(b"\xff\xfe not json")
  ckpt = state_lib.Checkpoints(tmp_path, keep=5)
  with pytest.raises(foreign.CheckpointCorruptError, match="every checkpoint .* is corrupt"):
    ckpt.restore(abstract, warn=warnings.append)
  ckpt.close()
  # A workdir left with only corrupt steps is not silently trained from step 0 again.
  (tmp_path / "run").mkdir()
  shutil.move(str(root), str(tmp_path / "run" / "checkpoints"))
  with pytest.raises(RuntimeError, match="refusing to train from step 0"):
    loop.train_and_evaluate(_config("tiny,steps=2,devices=1"), tmp_path / "run")


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _config("tiny,steps=20,devices=1", **{"optim.lr": 1e30, "optim.clip_norm": 0.0,
                                       "optim.warmup_epochs": 0.0,
                                       "checkpoint.every_steps": 1, "log_every_steps": 1})
  with pytest.raises(loop.NonFiniteLossError, match="last good checkpoint"):
    loop.train_and_evaluate(config, tmp_path)
  # The error did not skip closing: every save had finished and was sealed
  # when it returned. (Had it skipped, the last save would finish later, unsealed.)
  root = tmp_path / "checkpoints"
  deadline = time.time() + 30
  while any("tmp" in p.name for p in root.iterdir()) and time.time() < deadline:
    time.sleep(0.1)
  steps = [p for p in root.iterdir() if p.name.isdigit()]
  assert steps and all((p / run_checkpoints.CHECKSUMS).exists() for p in steps), steps
  ckpt = state_lib.Checkpoints(tmp_path)
  last = ckpt.latest_step()
  assert last is not None and last < 20
  # The kept checkpoint is a good one: it restores, and every array in it is finite.
  restored = ckpt.restore(loop.Run(config).abstract_state)
  assert int(restored["step"]) == last
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(restored["params"]))
  ckpt.close()


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# Training subprocesses compile the same steps again: they share a persistent XLA cache.
_XLA_CACHE = tempfile.mkdtemp(prefix="tps_jax_xla_cache_")


def _env(devices):
  return dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices), TF_CPP_MIN_LOG_LEVEL="2",
              PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=_XLA_CACHE,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def test_two_processes_with_jax_distributed_agree(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.distributed_train",
                             str(port), "2", str(i), str(tmp_path)], cwd=ROOT, env=_env(2),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  reports = [json.loads(next(l for l in o.splitlines() if l.startswith("REPORT "))[7:])
             for o in outs]
  assert [r["process"] for r in reports] == [0, 1]
  assert all(r["processes"] == 2 and r["devices"] == 4 and r["step"] == 3 for r in reports)
  assert reports[0]["examples"] == reports[1]["examples"] == 2000  # tiny: test[:2000]
  # The two processes' evaluation (each its half of the test set, counts summed) gives what
  # one process finds for the same parameters over the same 2000 images (the
  # processes' equal top-1 alone held by construction).
  single = loop.evaluate(_config("tiny,steps=3,batch=32,devices=1"), tmp_path / "params.npz")
  assert single["examples"] == 2000
  assert reports[0]["top1"] == reports[1]["top1"] == single["top1"]


@pytest.mark.parametrize("flaky, step", [(1, 2), (0, 1)])
def test_two_processes_act_on_one_verdict_about_a_checkpoint(tmp_path, flaky, step):
  # A step that reads as corrupt on one host only. Each process deciding on
  # its own sent that one to set the step aside (a barrier) while the other trained on: a
  # hang. Process 0 verifies and every process follows it: both restore the same step.
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.distributed_restore",
                             str(port), "2", str(i), str(tmp_path), str(flaky)], cwd=ROOT,
                            env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=120)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [0, 0], outs
  reports = [json.loads(next(l for l in o.splitlines() if l.startswith("REPORT "))[7:])
             for o in outs]
  assert [(r["step"], r["w"]) for r in reports] == [(step, float(step))] * 2
  assert all(r["aside"] == ([] if step == 2 else ["corrupt-2"]) for r in reports)


# Runs train.py and reports at exit whether anything imported TensorFlow.
_WATCH_TF = ("import atexit, runpy, sys; atexit.register(lambda: print('TENSORFLOW_IMPORTED', "
             "'tensorflow' in sys.modules, file=sys.stderr)); sys.argv = ['train.py'] + "
             "sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")


def test_signal_to_one_of_two_processes_stops_both_at_one_step(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, "-m", "tests.helpers.distributed_train",
                             str(port), "2", str(i), str(tmp_path), "2000"], cwd=ROOT,
                            env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for i in range(2)]
  metrics = tmp_path / "metrics.jsonl"  # written by process 0 at log steps
  deadline = time.time() + 240
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # process 1 only: one preempted host
  outs = [p.communicate(timeout=180) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
  reports = [json.loads(next(l for l in o[0].splitlines() if l.startswith("REPORT "))[7:])
             for o in outs]
  assert all(r["preempted"] for r in reports)
  assert reports[0]["step"] == reports[1]["step"] < 2000
  ckpt = state_lib.Checkpoints(tmp_path)
  assert ckpt.latest_step() == reports[0]["step"]
  ckpt.close()


def _train_cmd(workdir, steps, tensorboard=False):
  return [sys.executable, "-c", _WATCH_TF, "--config",
          f"configs/fashion_mnist.py:tiny,steps={steps},batch=16",
          "--workdir", str(workdir), f"--config.tensorboard={tensorboard}",
          "--config.checkpoint.every_steps=50", "--config.log_every_steps=5"]


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
  steps = 120
  # The README's training command as a new user runs it: TensorBoard on, no TensorFlow,
  # nothing printed but progress lines and the result.
  full = subprocess.run(_train_cmd(tmp_path / "full", steps, tensorboard=True), cwd=ROOT,
                        env=_env(1), capture_output=True, text=True, timeout=300)
  assert full.returncode == 0, full.stderr[-3000:]
  assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
  lines = [l for l in full.stderr.splitlines() if l.strip()]
  assert lines[-1] == "TENSORFLOW_IMPORTED False"
  noise = [l for l in lines[:-1] if not l.startswith(("[", "done: "))]
  assert not noise, noise
  proc = subprocess.Popen(_train_cmd(tmp_path / "cut", steps), cwd=ROOT, env=_env(1),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "cut" / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and any(json.loads(l)["step"] >= 10 for l in metrics.read_text().splitlines()):
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by signal" in err
  stopped = state_lib.Checkpoints(tmp_path / "cut")
  cut_step = stopped.latest_step()
  stopped.close()
  assert 10 <= cut_step < steps and cut_step % 50 != 0  # saved at the signal, not a schedule
  again = subprocess.run(_train_cmd(tmp_path / "cut", steps), cwd=ROOT, env=_env(1),
                         capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming from {tmp_path / 'cut' / 'checkpoints'}/{cut_step}" in again.stderr
  a, b = np.load(tmp_path / "full" / "params.npz"), np.load(tmp_path / "cut" / "params.npz")
  assert sorted(a.files) == sorted(b.files)
  for k in a.files:
    np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_restore_onto_a_different_mesh(tmp_path):
  overrides = {"model.width": 64, "model.mlp_dim": 256}
  config = _config("tiny,steps=2,batch=32", **overrides)
  config.mesh = dict(data=2, fsdp=4, min_shard_size=4096)
  loop.train_and_evaluate(config, tmp_path)
  other = _config("tiny,steps=2,batch=32", **overrides)
  other.mesh = dict(data=1, fsdp=1, num_devices=1)
  run = loop.Run(other)  # knows the state's layout without building a fresh state
  ckpt = state_lib.Checkpoints(tmp_path)
  restored = ckpt.restore(run.abstract_state)
  ckpt.close()
  kernel = restored["params"]["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert len(kernel.sharding.device_set) == 1 and int(restored["step"]) == 2
  saved = np.load(tmp_path / "params.npz")
  np.testing.assert_array_equal(
      np.asarray(kernel), saved["Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"])


def test_imagenet_recipes_follow_the_spec():
  c = imagenet.get_config("variant=S,method=dtps,init=deit_s.pth")
  assert c.optim.lr == 2.5e-4 and c.optim.backbone_lr_scale == 0.01
  assert c.loss.keep_weight == 2.0 and c.loss.distill_weight == 0.5
  assert c.total_epochs == 30 and c.input.batch_size == 1024 and c.optim.warmup_epochs == 5
  assert c.mixing.mixup_alpha == 0.8 and c.mixing.cutmix_alpha == 1.0
  assert c.mixing.smoothing == 0.1 and c.input.preprocess.erasing == 0.25
  assert c.teacher.checkpoint == "deit_s.pth" and tuple(c.init.fresh) == ("score_heads",)
  e = imagenet.get_config("variant=Ti,method=etps,keep=0.5,init=x.pth")
  assert e.optim.backbone_lr_scale == 1.0 and e.loss.keep_weight == 0.0
  assert common.reduction("etps", 0.5)["keep_ratio"] == 0.5
