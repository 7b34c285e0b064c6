"""Metric sinks on process 0: TensorBoard (tensorboardX, no TensorFlow), JSONL, console, W&B."""

from __future__ import annotations

import json
import time
from typing import Any, Mapping

import jax
from absl import logging

from jaxfm import workdir as workdir_lib


class JsonLines:
  """The JSON lines of one run segment (`workdir.metrics_segment`): appended and flushed line by
  line on a local disk; on an object store, which has no append, this segment's lines are kept
  and its file rewritten whole, at most every `rewrite_s` seconds and on close."""

  def __init__(self, workdir: str, start_step: int, rewrite_s: float = 30.0):
    self._path = workdir_lib.metrics_segment(workdir, start_step)
    self._rewrite_s, self._rewritten_at, self._lines = rewrite_s, -float("inf"), []
    self._file = None if workdir_lib.on_object_store(workdir) else self._path.open("a")

  def write(self, line: str) -> None:
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
      return
    self._lines.append(line)
    if time.monotonic() - self._rewritten_at >= self._rewrite_s:
      self._rewrite()

  def _rewrite(self) -> None:
    self._path.write_text("".join(self._lines))
    self._rewritten_at = time.monotonic()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
    else:
      self._rewrite()


class MetricWriter:
  """Writes scalars from process 0 only; every other process gets a no-op writer."""

  def __init__(self, workdir: str, wandb_project: str = "", config: Mapping[str, Any] | None = None,
               start_step: int = 0):
    self._active = jax.process_index() == 0
    self._tb = self._jsonl = self._wandb = None
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(workdir_lib.tensorboard_dir(workdir)))
    self._jsonl = JsonLines(workdir, start_step)
    if wandb_project:
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise RuntimeError("train.wandb_project is set but wandb is not installed: "
                           "pip install 'jaxfm[wandb]'") from e
      self._wandb = wandb.init(project=wandb_project, config=dict(config or {}), dir=workdir,
                               id=workdir_lib.wandb_run_id(workdir), resume="allow")

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    if not self._active:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    if self._wandb is not None:
      self._wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()
      if self._wandb is not None:
        self._wandb.finish()


def log_line(step: int, scalars: Mapping[str, float], prefix: str) -> None:
  """One concise console line (process 0 only)."""
  if jax.process_index() == 0:
    text = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
    logging.info("[%s] step %d: %s", prefix, step, text)
