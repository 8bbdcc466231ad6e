"""What a person sees: a progress line, JSON lines and TensorBoard events (process 0 only).

TensorBoard event files are written by tensorboardX: no TensorFlow needed.
"""

from __future__ import annotations

import os
import sys
import time

from etils import epath
import jax

from tps_jax import atomic


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Writer:
  """Writes `metrics.jsonl` and TensorBoard event files under `workdir`; prints progress."""

  def __init__(self, workdir: str | os.PathLike, total_steps: int, *, tensorboard: bool = True,
               stream=None):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.stream = stream or sys.stderr
    self._tb = None
    if not self.active:
      return
    self.workdir = epath.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = self.workdir / "metrics.jsonl"
    # A local file is appended to; object stores (gs://) cannot append, so there the whole
    # file is rewritten atomically at each record (kilobytes to a few megabytes).
    self._append = "://" not in str(workdir)
    self._lines = None if self._append or not self._jsonl.exists() else \
        self._jsonl.read_text().splitlines(keepends=True)
    self._file = open(self._jsonl, "a", encoding="utf-8") if self._append else None
    if tensorboard:
      try:
        import tensorboardX  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise ImportError("TensorBoard logging needs tensorboardX (pip install tensorboardX, "
                          "or run with --config.tensorboard=False).") from e
      self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"), flush_secs=30)

  def write(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
    if not self.active:
      return
    record = {"step": int(step), "kind": kind, "time": time.time(),
              **{k: float(v) for k, v in metrics.items()}}
    line = atomic.to_json(record) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines = (self._lines or []) + [line]
      atomic.write_text(self._jsonl, "".join(self._lines))
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.add_scalar(f"{kind}/{k}", float(v), int(step))
      self._tb.flush()

  def progress(self, step: int, metrics: dict[str, float], images_per_s: float,
               eta_s: float) -> None:
    if not self.active:
      return
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    shown = " ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "ce", "keep", "kl", "token",
                                                         "accuracy") if k in metrics)
    line = (f"[{bar}] step {step}/{self.total_steps} {shown} | {images_per_s:.0f} img/s "
            f"| eta {_fmt_time(eta_s)}")
    end = "\r" if self.stream.isatty() else "\n"
    print(line, end=end, file=self.stream, flush=True)

  def message(self, text: str) -> None:
    if self.active:
      print(text, file=self.stream, flush=True)

  def close(self) -> None:
    if self.active:
      if self._file is not None:
        self._file.close()
        self._file = None
      if self._tb is not None:
        self._tb.close()
        self._tb = None
