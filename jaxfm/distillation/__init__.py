"""Knowledge distillation of fine-tuned encoders (`python -m jaxfm.distill`).

`losses` (soft targets, hidden-state MSE, MiniLM relations), `capture` (logits, hidden states
and attention inputs read from outside the model), `teacher` (a fine-tuning workdir, frozen;
an int8 folder or quantization-aware workdir runs as its int8 model),
`cache` (the teacher's top-k logits on disk), `student` (architecture and starting params)
`run` (the runner over the shared loop) and `mlm` (task-agnostic distillation on a corpus).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from jaxfm.distillation import mlm, run


def distill(cfg: ml_collections.ConfigDict, workdir: str,
            allow_config_change: bool = False) -> tuple[Any, int | None]:
  """The runner for the config's task: task-agnostic (mlm) or a fine-tuned task's."""
  if cfg.get("task") == "mlm":
    return mlm.distill_mlm(cfg, workdir, allow_config_change)
  return run.distill(cfg, workdir, allow_config_change)
