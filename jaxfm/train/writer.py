"""Metric sinks on process 0: TensorBoard (tensorboardX, no TensorFlow), JSONL, console, W&B."""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
from absl import logging

from jaxfm import workdir as workdir_lib


class MetricWriter:
  """Writes scalars from process 0 only; every other process gets a no-op writer."""

  def __init__(self, workdir: str, wandb_project: str = "", config: Mapping[str, Any] | None = None):
    self._active = jax.process_index() == 0
    self._tb = self._jsonl = self._wandb = None
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(str(workdir_lib.tensorboard_dir(workdir)))
    self._jsonl = workdir_lib.metrics_file(workdir).open("a")
    if wandb_project:
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError as e:
        raise RuntimeError("train.wandb_project is set but wandb is not installed: "
                           "pip install 'jaxfm[wandb]'") from e
      self._wandb = wandb.init(project=wandb_project, config=dict(config or {}),
                               dir=workdir, resume="allow")

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "train") -> None:
    if not self._active:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}/{name}", value, step)
    self._jsonl.write(json.dumps({"step": step, "split": prefix, **scalars}) + "\n")
    self._jsonl.flush()
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
