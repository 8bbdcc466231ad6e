"""The training loop: one jitted, sharded step; Orbax checkpoints; evaluation and summary.

  summary = train_and_evaluate(config, workdir)
  summary = evaluate(config, checkpoint)     # top-1, MACs and images/s of a checkpoint

`config` is an ml_collections ConfigDict shaped as `configs/common.py` builds it.
A workdir that already holds checkpoints resumes at its latest step: the
same parameters, optimizer state, rng and data position (the input stream is
a function of the step), on whatever mesh this run has.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from tps_jax import atomic, checkpoints, data
from tps_jax.checkpoints import runs as run_checkpoints
from tps_jax.models.vit import VisionTransformer, build_model
from tps_jax.trainer import (evaluation, losses, metrics as metrics_lib, optim, sharding,
                             state as state_lib)


class NonFiniteLossError(FloatingPointError):
  """The loss or the gradients became NaN / inf; the last good checkpoint is kept."""


def _to_dict(cfg) -> dict:
  """A ConfigDict or mapping -> plain dict, lists (from JSON-like configs) as tuples."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
  return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()}


def _dummy(model: VisionTransformer):
  return jnp.zeros((1, model.image_size, model.image_size, model.channels), jnp.float32)


class _Stop:
  """Set by SIGTERM / SIGINT: the loop saves a checkpoint at the current step and returns.

  With several processes a signal may reach only some of them (one host is
  preempted). They agree at the steps where they synchronise anyway (log and
  checkpoint steps): if any process was signalled, all save the same step and
  leave together, so none is left waiting in the next collective.
  """

  def __init__(self):
    self.event = threading.Event()
    self._previous = {}

  def requested(self, sync_point: bool) -> bool:
    """Whether to stop now: this process's signal, agreed across processes at sync points."""
    if jax.process_count() == 1:
      return self.event.is_set()
    if not sync_point:
      return False
    flags = multihost_utils.process_allgather(np.array(self.event.is_set(), np.int32))
    return bool(np.any(flags))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, lambda *_: self.event.set())
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _input(config):
  inp = config.input
  kw = _to_dict(inp.get("source_kw", {}))
  source = data.get_source(inp.dataset, data_dir=inp.get("data_dir"), **kw)
  return source, data.Preprocess(**_to_dict(inp.preprocess))


def _total_steps(config, steps_per_epoch: int) -> int:
  if config.get("total_steps"):
    return int(config.total_steps)
  return max(1, int(round(config.total_epochs * steps_per_epoch)))


def _host(tree):
  """Device arrays -> numpy on every process (gathers shards that live on other hosts)."""
  if jax.process_count() > 1:
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.device_get(tree)


EVAL_PRECISIONS = ("train", "float32")  # config.eval_precision: as trained, or float32


def make_train_step(model: VisionTransformer, tx, *, num_classes: int, mixing: data.Mixing,
                    loss_cfg: dict, teacher: VisionTransformer | None,
                    preprocess: data.Preprocess,
                    batch_sharding: jax.sharding.NamedSharding | None = None,
                    param_shardings=None):
  """(state, batch, teacher_params) -> (state, metrics); non-finite gradients are skipped.

  `batch["image"]` is the host's uint8 (B, S, S, C); the device part of the
  augmentation (RandAugment, normalisation, erasing, mixing) happens here,
  keyed by (seed, step, row). Given the batch's sharding, mixing pairs rows
  within each device's shard (`data.mix_per_shard`, timm's per-GPU Mixup). Given the parameters'
  shardings, the gradients take them (FSDP: a reduce-scatter of the partial sums).
  """
  reduction = model.reduction

  def step_fn(state, batch, teacher_params):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    k_aug, k_mix, k_gumbel, k_drop = jax.random.split(rng, 4)
    images = data.train_images(k_aug, batch["image"], preprocess)
    if batch_sharding is not None and mixing.active:
      images, targets = data.mix_per_shard(k_mix, images, batch["label"], num_classes, mixing,
                                           batch_sharding)
    else:
      images, targets = data.mix(k_mix, images, batch["label"], num_classes, mixing)
    teacher_out = None
    if teacher is not None:
      t_logits, t_out = teacher.apply({"params": teacher_params}, images, train=False)
      teacher_out = (t_logits, t_out["encoded"])

    def loss_fn(params):
      logits, out = model.apply({"params": params}, images, train=True,
                                rngs={"gumbel": k_gumbel, "dropout": k_drop})
      loss, terms = losses.objective(
          logits, out, targets, keep_ratios=reduction.keep_ratios,
          keep_weight=loss_cfg.get("keep_weight", 0.0), teacher=teacher_out,
          distill_weight=loss_cfg.get("distill_weight", 0.0),
          token_distill=loss_cfg.get("token_distill", True), prefix=model.num_prefix,
          has_cls=model.has_cls)
      return loss, (terms, logits)

    (loss, (terms, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    if param_shardings is not None:  # each gradient laid out as its parameter: under FSDP the
      # partial sums over the batch are then reduce-scattered, not all-reduced at full size
      grads = jax.lax.with_sharding_constraint(grads, param_shardings)
    grad_norm = optax.tree.norm(grads)
    # optax.apply_if_finite (in the optimizer) skips the update if the gradients are not finite.
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new_state = {"step": state["step"] + 1,
                 "params": optax.apply_updates(state["params"], updates),
                 "opt_state": opt_state, "rng": state["rng"]}
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))
    out = {"loss": loss, "grad_norm": grad_norm, "accuracy": accuracy,
           "nonfinite": 1.0 - finite.astype(jnp.float32), **terms}
    return new_state, out

  return step_fn


class Run:
  """Everything one config needs, built once: mesh, data, model, optimizer, state layout.

  After construction `abstract_state` (shapes and shardings) is known, so a
  checkpoint can be restored without building a fresh state first.
  """

  def __init__(self, config, *, devices=None):
    """devices: the mesh's devices (default every device; e.g. a TPU topology's, to compile
    the step for a pod from this machine: benchmarks/pod_compile.py)."""
    self.config = config
    self.layout = sharding.from_config(config, devices=devices)
    self.mesh = self.layout.mesh
    self.data_sharding = self.layout.batch()
    self.source, self.preprocess = _input(config)
    inp = config.input
    self.num_classes = config.get("num_classes") or self.source.num_classes
    self.local_batch = data.local_batch_size(inp.batch_size, self.data_sharding)
    try:  # checked now, not at the first evaluation hours in
      data.local_batch_size(inp.get("eval_batch_size", inp.batch_size), self.data_sharding)
    except ValueError as e:
      raise ValueError(f"config.input.eval_batch_size: {e}") from None
    self.steps_per_epoch = data.steps_per_epoch(
        self.source.num_examples(inp.train_split), self.local_batch, jax.process_count())
    self.total_steps = _total_steps(config, self.steps_per_epoch)
    mp = config.get("mixed_precision", False)
    self.model = build_model(config.model, self.num_classes, mixed_precision=mp)
    if self.model.channels != self.preprocess.channels:
      raise ValueError(f"the model takes {self.model.channels}-channel images but the input "
                       f"pipeline makes {self.preprocess.channels} (config.input.preprocess."
                       f"channels vs config.model.channels).")
    # Evaluation (top-1 and images/s) runs the model as it trains: in bfloat16 for a mixed-
    # precision run, unless config.eval_precision = "float32".
    self.eval_precision = config.get("eval_precision", "train")
    if self.eval_precision not in EVAL_PRECISIONS:
      raise ValueError(f"unknown config.eval_precision {self.eval_precision!r}; expected one "
                       f"of {EVAL_PRECISIONS}.")
    self.eval_model = build_model(config.model, self.num_classes,
                                  mixed_precision=mp and self.eval_precision == "train")
    opt = _to_dict(config.optim)
    warmup_epochs = opt.pop("warmup_epochs", 0.0)
    opt.setdefault("warmup_steps", int(round(warmup_epochs * self.steps_per_epoch)))
    self.teacher, self.teacher_params = None, None
    self.mixing = data.Mixing(**_to_dict(config.get("mixing", {})))

    self._k_init, self._k_train = jax.random.split(jax.random.key(config.seed))
    abstract_params = jax.eval_shape(self._init_params, self._k_init)
    self.tx, self.schedule = optim.make_optimizer(abstract_params, total_steps=self.total_steps,
                                                  **opt)
    abstract = jax.eval_shape(self._make_state, abstract_params)
    self.state_shardings = self.layout.tree(abstract)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
        self.state_shardings)

  def _init_params(self, rng):
    return self.model.init({"params": rng}, _dummy(self.model))["params"]

  def _make_state(self, params):
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.tx.init(params), "rng": jax.random.key_data(self._k_train)}

  def init_state(self):
    """A fresh state (from `config.init.checkpoint` if given), laid out by the rules."""
    init = self.config.get("init", {}) or {}
    if init.get("checkpoint"):
      params = checkpoints.load_params(init.checkpoint, self.eval_model,
                                     fresh=tuple(init.get("fresh", ())), rng=self._k_init)
      params = jax.device_put(params, self.state_shardings["params"])
    else:
      params = jax.jit(self._init_params,
                       out_shardings=self.state_shardings["params"])(self._k_init)
    return jax.jit(self._make_state, out_shardings=self.state_shardings)(params)

  def load_teacher(self):
    cfg = self.config
    teacher_cfg = cfg.get("teacher", {}) or {}
    if not teacher_cfg.get("checkpoint"):
      return
    model_cfg = teacher_cfg.get("model") or {**_to_dict(cfg.model), "reduction": None,
                                             "drop_path": 0.0}
    self.teacher = build_model(model_cfg, self.num_classes,
                               mixed_precision=cfg.get("mixed_precision", False))
    # Parameters are float32 whatever the compute dtype, so the teacher itself says what to load.
    params = checkpoints.load_params(teacher_cfg.checkpoint, self.teacher)
    self.teacher_params = jax.device_put(
        params, self.layout.tree(params, prefix="params"))

  def compile(self):
    cfg = self.config
    step_fn = make_train_step(self.model, self.tx, num_classes=self.num_classes,
                              mixing=self.mixing, loss_cfg=_to_dict(cfg.get("loss", {})),
                              teacher=self.teacher, preprocess=self.preprocess,
                              batch_sharding=self.data_sharding,
                              param_shardings=self.state_shardings["params"])
    teacher_sh = (self.layout.tree(self.teacher_params, prefix="params")
                  if self.teacher_params is not None else None)
    repl = self.layout.replicated()
    self.train_step = jax.jit(self.layout.trace(step_fn), in_shardings=(self.state_shardings, self.data_sharding,
                                                     teacher_sh),
                              out_shardings=(self.state_shardings, repl), donate_argnums=0)
    self.compile_eval()

  def compile_eval(self):
    repl = self.layout.replicated()
    self.eval_step = jax.jit(evaluation.make_eval_step(self.eval_model, self.preprocess),
                             in_shardings=(self.state_shardings["params"], self.data_sharding),
                             out_shardings=(repl, repl))

  def evaluate(self, params, *, speed_repeats: int = 0) -> dict[str, float]:
    inp = self.config.input
    return evaluation.top1(self.eval_step, params, self.source, inp.eval_split, self.preprocess,
                           global_batch=inp.get("eval_batch_size", inp.batch_size),
                           data_sharding=self.data_sharding,
                           bad_budget=inp.get("bad_image_budget", data.BAD_BUDGET),
                           speed_repeats=speed_repeats)

  def summary(self, params, *, speed_repeats: int = 5) -> dict[str, Any]:
    """Top-1 over the eval split, GMACs and inference images/s: the one evaluation path. The
    images/s is the compiled evaluation program's on the split's first batch (at the eval
    batch size; normalisation and argmax included), so nothing compiles twice."""
    return {**self.evaluate(params, speed_repeats=speed_repeats),
            "eval_dtype": jnp.dtype(self.eval_model.dtype).name,
            **evaluation.cost(self.eval_model)}


def _check_finite(step: int, fetched: list[dict], writer, ckpt) -> None:
  bad = [m for m in fetched if m["nonfinite"] > 0]
  if bad:
    last = ckpt.latest_step()
    writer.message(f"non-finite loss or gradients near step {step} (loss={bad[0]['loss']}); "
                   f"stopping. The last good checkpoint is step {last}.")
    raise NonFiniteLossError(
        f"loss became NaN/inf near step {step}; the last good checkpoint (step {last}) is "
        f"kept in {ckpt.directory}. Lower the learning rate or enable clip_norm.")


def train_and_evaluate(config, workdir: str | os.PathLike) -> dict[str, Any]:
  """Trains (or resumes) to config's total steps, evaluates, returns the summary.

  `workdir` may be local or, through `etils.epath`, an object store (`gs://...`). However the
  run ends (done, a signal, an error such as NonFiniteLossError), pending checkpoint saves are
  finished and sealed and the metrics are closed.
  """
  workdir = epath.Path(workdir)
  run = Run(config)
  ckpt_cfg = _to_dict(config.get("checkpoint", {}))
  ckpt = state_lib.Checkpoints(workdir, every_steps=ckpt_cfg.get("every_steps", 1000),
                               keep=ckpt_cfg.get("keep", 3),
                               async_save=ckpt_cfg.get("async_save", True))
  writer = metrics_lib.Writer(workdir, run.total_steps,
                              tensorboard=config.get("tensorboard", True))
  try:
    return _train(config, run, workdir, ckpt, ckpt_cfg, writer)
  finally:
    try:
      ckpt.close()
    finally:
      writer.close()


def _train(config, run: Run, workdir: epath.Path, ckpt: state_lib.Checkpoints, ckpt_cfg: dict,
           writer: metrics_lib.Writer) -> dict[str, Any]:
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(workdir / "config.json", config.to_json_best_effort(indent=2) + "\n")

  if ckpt.latest_step() is not None:  # the newest intact step; corrupt ones are set aside
    state = ckpt.restore(run.abstract_state, warn=writer.message)
    writer.message(f"resuming from {ckpt.directory}/{int(state['step'])}")
  else:
    aside = ckpt.set_aside_steps()
    if aside and not ckpt_cfg.get("fresh_despite_corrupt", False):
      raise RuntimeError(
          f"{ckpt.directory} holds only steps set aside as corrupt ({aside}); refusing to "
          f"train from step 0 over them. Repair or delete them, or set "
          f"--config.checkpoint.fresh_despite_corrupt=True to start afresh.")
    state = run.init_state()
  start = int(state["step"])
  run.load_teacher()
  run.compile()

  inp = config.input
  batches = data.device_prefetch(
      data.train_batches(run.source, inp.train_split, run.preprocess,
                         local_batch=run.local_batch, seed=config.seed, start_step=start,
                         threads=inp.get("threads") or None, workers=inp.get("workers", 0),
                         bad_budget=inp.get("bad_image_budget", data.BAD_BUDGET)),
      run.data_sharding)
  log_every = config.get("log_every_steps", 50)
  eval_every = config.get("eval_every_steps", 0)
  eval_at = {int(s) for s in config.get("eval_at_steps", ()) or ()}
  pending: list = []
  t_last, step_last = time.perf_counter(), start
  preempted = False
  # Leaving the block (normally, by signal or by error) stops the prefetch thread and
  # the input readers before anything else is torn down.
  with _Stop() as stop, contextlib.closing(batches):
    for step in range(start + 1, run.total_steps + 1):
      batch = next(batches)
      state, m = run.train_step(state, batch, run.teacher_params)
      pending.append(m)
      last = step == run.total_steps
      sync = step % log_every == 0 or ckpt.due(step) or last
      stopping = stop.requested(sync)  # read once: a signal between two reads must not skip the save
      save = ckpt.due(step) or last or stopping
      if sync or save:
        fetched = jax.device_get(pending)
        pending = []
        _check_finite(step, fetched, writer, ckpt)
        mean = {k: float(np.mean([f[k] for f in fetched])) for k in fetched[0]}
        mean["lr"] = float(run.schedule(step))
        now = time.perf_counter()
        rate = (step - step_last) * inp.batch_size / max(now - t_last, 1e-9)
        mean["images_per_s"] = rate
        writer.write(step, mean)
        writer.progress(step, mean, rate, (run.total_steps - step) * inp.batch_size / rate)
        t_last, step_last = now, step
        if save:
          ckpt.save(step, state, wait=stopping)
      if ((eval_every and step % eval_every == 0) or step in eval_at) and not last:
        writer.write(step, run.evaluate(state["params"]), kind="eval")
      if stopping:
        writer.message(f"stopped by signal at step {step}; checkpoint saved, rerun to resume.")
        preempted = True
        break
  ckpt.close()  # the last save finished and sealed before the evaluation
  if preempted:
    return {"preempted": True, "step": int(state["step"])}

  summary = run.summary(state["params"])
  summary["step"] = int(state["step"])
  writer.write(summary["step"], {k: v for k, v in summary.items()
                                 if isinstance(v, (int, float))}, kind="final")
  params = _host(state["params"])
  if jax.process_index() == 0:
    run_checkpoints.save_params_npz(params, workdir / "params.npz")
    atomic.write_json(workdir / "summary.json", summary)
  writer.message(f"done: top-1 {100 * summary['top1']:.2f}% on {summary['examples']} examples | "
                 f"{summary['gmacs']:.3f} GMACs | {summary['images_per_s']:.0f} img/s "
                 f"({summary['method']})")
  return summary


def evaluate(config, checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
  """Top-1, MACs and images/s of the model in `config` with parameters from `checkpoint`."""
  run = Run(config)
  path = checkpoint or (config.get("init", {}) or {}).get("checkpoint")
  if not path:
    raise ValueError("evaluate needs a checkpoint (a workdir, params.npz or a state dict).")
  params = jax.device_put(checkpoints.load_params(path, run.eval_model),
                          run.state_shardings["params"])
  run.compile_eval()
  summary = run.summary(params)
  summary["checkpoint"] = str(path)
  return summary

