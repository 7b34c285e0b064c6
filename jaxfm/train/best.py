"""The best checkpoint by an eval metric (Orbax `best_fn`), beside the latest, and early stopping.

`WORKDIR/best/<step>/` holds the params of the best evaluation so far (Orbax keeps one,
chosen by `best_fn`); `evaluate`/`predict` read it. Only a strictly better score replaces
the best (Orbax alone would let a tie replace it). Early stopping needs no state of its own:
the evaluations since the best are `(step - best_step) / eval_every`.
"""

from __future__ import annotations

import math
from typing import Any

import orbax.checkpoint as ocp

from jaxfm.train import checkpoint
from jaxfm.workdir import best_dir

PARAMS, METRICS = "params", "metrics"


class BestMetricError(KeyError):
  """The chosen metric is not among the evaluation's metrics."""


class BestCheckpoint:
  """Saves params at each evaluation; Orbax keeps the best by `metric` (`mode` max or min)."""

  def __init__(self, workdir: str, metric: str, mode: str, patience: int, eval_every: int):
    self.metric, self.patience, self.eval_every = metric, patience, eval_every
    self.sign = 1.0 if mode == "max" else -1.0
    # Its own barrier names: its async saves run beside the train-state manager's, and two
    # managers on Orbax's default (global) names collide in JAX's coordination service when
    # both save at once on several processes ("Barrier ... is already ongoing").
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1, best_fn=lambda metrics: metrics[metric], best_mode=mode, create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix="jaxfm_best"))
    self.manager = ocp.CheckpointManager(best_dir(workdir), options=options,
                                         item_names=(PARAMS, METRICS))
    step = self.manager.best_step()
    self.best_value = None if step is None else float(self.manager.restore(
        step, args=ocp.args.Composite(**{METRICS: ocp.args.JsonRestore()}))[METRICS][metric])

  def update(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    """Saves the params evaluated at `step` if their score is strictly the best so far."""
    if self.metric not in metrics:
      raise BestMetricError(f"train.best_metric={self.metric!r} is not an eval metric; choose "
                            f"one of {sorted(metrics)}")
    value = float(metrics[self.metric])
    if not math.isfinite(value) or (
        self.best_value is not None and self.sign * value <= self.sign * self.best_value):
      return
    self.best_value = value
    # Orbax writes `metrics` as the step's METRICS item (and ranks by it): all of them, so
    # `restore_best` gives the whole evaluation.
    self.manager.save(step, args=ocp.args.Composite(**{PARAMS: ocp.args.StandardSave(params)}),
                      metrics={name: float(v) for name, v in metrics.items()}, force=True)

  def best_step(self) -> int | None:
    return self.manager.best_step()

  def should_stop(self, step: int) -> bool:
    """True once `patience` evaluations in a row have not improved on the best."""
    best = self.best_step()
    return bool(self.patience) and best is not None and (
        step - best >= self.patience * self.eval_every)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_best(workdir: str, abstract_params: Any = None
                 ) -> tuple[int, Any, dict[str, float]] | None:
  """(step, params, metrics) of the best checkpoint in `workdir`, or None if it has none.

  Without `abstract_params` the params are restored as saved, onto this process's first
  device (for readers that do not build the model, e.g. export).
  """
  if not best_dir(workdir).exists():
    return None
  # The handlers let `item_metadata` read the params' shapes before any restore.
  manager = ocp.CheckpointManager(best_dir(workdir), item_names=(PARAMS, METRICS),
                                  item_handlers={PARAMS: ocp.StandardCheckpointHandler(),
                                                 METRICS: ocp.JsonCheckpointHandler()})
  step = manager.best_step() or manager.latest_step()
  if step is None:
    manager.close()
    return None
  if abstract_params is None:
    abstract_params = checkpoint.on_first_device(manager.item_metadata(step)[PARAMS])
  restored = manager.restore(step, args=ocp.args.Composite(**{
      PARAMS: ocp.args.StandardRestore(abstract_params), METRICS: ocp.args.JsonRestore()}))
  manager.close()
  return step, restored[PARAMS], restored[METRICS]
