"""The periodic work around the train step, as small actions the loop calls after every step.

Each action owns one concern and its cadence, in the manner of clu's periodic actions and
Levanter's hooks: `action(info)` runs after each step and returns True to end the run, and
then the actions after it in the loop's list do not run for that step. The list's order is
the order of the work within a step: profile, report, guard, timed save, evaluate, keep the best
(and stop early), periodic save, preemption.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import signal
import time
from typing import Any, Callable, Iterator, Protocol

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from jaxfm.train import checkpoint
from jaxfm.train.best import BestCheckpoint
from jaxfm.train.evaluation import summed
from jaxfm.train.flops import peak_flops_per_device
from jaxfm.train.state import TrainState
from jaxfm.train.step import Sums
from jaxfm.train.writer import MetricWriter, log_line


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with non-finite loss or gradients."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What the actions see after a step.

  Attributes:
    step: the steps done, i.e. the state's step after this update.
    state: the train state after this update.
    metrics: this step's metrics, on device.
    batch_shape: the shape of the global batch's `input_ids` (batch, length).
  """

  step: int
  state: TrainState
  metrics: Sums
  batch_shape: tuple[int, ...]


class Action(Protocol):
  """Work after a step; True ends the run there."""

  def __call__(self, info: StepInfo) -> bool: ...


@contextlib.contextmanager
def timed(spent: collections.Counter[str], action: Any) -> Iterator[None]:
  """Adds the seconds the body takes to `spent[<action's class name>]`."""
  start = time.perf_counter()
  try:
    yield
  finally:
    spent[type(action).__name__] += time.perf_counter() - start


def run_after_step(after_step: list[Action], info: StepInfo,
                   spent: collections.Counter[str]) -> Action | None:
  """Runs the actions in order, timing each; the first that ends the run does so at once (those
  after it do not run) and is returned."""
  for action in after_step:
    with timed(spent, action):
      if action(info):
        return action
  return None


# What the end-of-run line reports the loop's time in: saves block only while the state is
# copied off the devices (Orbax writes in the background).
_SPENT = {"evaluation": ("Evaluation",),
          "checkpoint saves": ("KeepBest", "TimedCheckpoint", "PeriodicCheckpoint", "Preemption")}


def log_time_spent(loop_s: float, spent: collections.Counter[str]) -> None:
  """One line: the loop's wall time and the share of it evaluations and saves took."""
  parts = [f"{name} {sum(spent[a] for a in kinds):.1f} s "
           f"({sum(spent[a] for a in kinds) / max(loop_s, 1e-9):.1%})"
           for name, kinds in _SPENT.items()]
  logging.info("training loop %.1f s, of which %s", loop_s, ", ".join(parts))


def due(step: int, every: int, last: int) -> bool:
  """Whether `step` is a multiple of `every` or the run's `last` step."""
  return step % every == 0 or step == last


class ReportProgress:
  """Train metrics, throughput and MFU of the steps since the last report, every `every` steps
  and at the `last`, with the loader's `counters` (e.g. examples seen per source); a console
  line every tenth report when the progress bar shows."""

  def __init__(self, summarize: Callable[[dict[str, float]], dict[str, float]],
               flops_per_token: Callable[[int], float], schedule: optax.Schedule,
               compile_s: Callable[[], float], writer: MetricWriter, bar: tqdm.tqdm,
               every: int, last: int, counters: Callable[[], dict[str, float]] = dict):
    self._summarize, self._flops_per_token, self._schedule = summarize, flops_per_token, schedule
    self._compile_s, self._writer, self._bar = compile_s, writer, bar
    self._counters = counters
    self.every, self.last = every, last
    self._peak = peak_flops_per_device(jax.devices()[0].device_kind)
    self.metrics: dict[str, float] = {}  # the latest report
    self._restart()

  def _restart(self) -> None:
    self._pending: list[Sums] = []
    self._start, self._tokens, self._flops = time.perf_counter(), 0, 0.0

  def __call__(self, info: StepInfo) -> bool:
    tokens = math.prod(info.batch_shape)
    self._tokens += tokens
    self._flops += tokens * self._flops_per_token(info.batch_shape[1])
    self._pending.append(info.metrics)
    self._bar.update(1)
    if due(info.step, self.every, self.last):
      self._report(info)
      self._restart()
    return False

  def _report(self, info: StepInfo) -> None:
    sums, steps = summed(self._pending), len(self._pending)
    elapsed = time.perf_counter() - self._start
    tokens_per_s = self._tokens / elapsed
    self.metrics = {
        **self._summarize(sums),
        "grad_norm": sums["grad_norm"] / steps,
        "learning_rate": float(jax.device_get(self._schedule(info.step - 1))),
        "nonfinite_steps": steps - sums["finite"],
        "skipped_steps_total": float(jax.device_get(info.state.skipped_steps)),
        "tokens_per_s": tokens_per_s,
        "compile_s": self._compile_s(),
        **self._counters(),
    }
    if self._peak:
      self.metrics["mfu"] = self._flops / elapsed / (self._peak * jax.device_count())
    self._writer.write(info.step, self.metrics, "train")
    self._bar.set_postfix(loss=f"{self.metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
    if not self._bar.disable and info.step % (self.every * 10) == 0:
      log_line(info.step, self.metrics, "train")


class Checkpointer:
  """Saves the train state with the loader's state and the run's metadata, and remembers when.

  With `train.skip_nonfinite=False` the params of a non-finite step are not saved, so the
  newest checkpoint stays the last good one.
  """

  def __init__(self, manager: ocp.CheckpointManager, data_state: Callable[[], Any],
               meta: dict[str, Any], skip_nonfinite: bool):
    self.manager, self._data_state, self._meta = manager, data_state, meta
    self._skip_nonfinite = skip_nonfinite
    self.last_save = time.monotonic()  # of the last save asked for, made or refused

  def save(self, state: TrainState, step: int, force: bool = False) -> None:
    if not self._skip_nonfinite and int(jax.device_get(state.consecutive_nonfinite)):
      logging.warning("step %d: not checkpointing non-finite params (train.skip_nonfinite=False)",
                      step)
    else:
      checkpoint.save(self.manager, step, state, self._data_state(), self._meta, force=force)
    self.last_save = time.monotonic()

  def save_last(self, state: TrainState, step: int) -> None:
    """A forced save of `step` where the run ends early, unless `step` is saved already."""
    if self.manager.latest_step() != step:
      self.save(state, step, force=True)


class NonFiniteGuard:
  """Ends the run with `NonFiniteError` once `limit` steps in a row had non-finite loss or
  gradients; checked at each report (`every`, `last`), as it reads a value from the device."""

  def __init__(self, manager: ocp.CheckpointManager, limit: int, skip_nonfinite: bool,
               every: int, last: int):
    self._manager, self._limit, self._skip_nonfinite = manager, limit, skip_nonfinite
    self.every, self.last = every, last

  def __call__(self, info: StepInfo) -> bool:
    if not due(info.step, self.every, self.last):
      return False
    streak = int(jax.device_get(info.state.consecutive_nonfinite))
    if streak >= self._limit:
      self._manager.wait_until_finished()
      raise NonFiniteError(
          f"{streak} consecutive steps up to step {info.step} had non-finite loss or gradients "
          f"(train.skip_nonfinite={self._skip_nonfinite}); stopping. The last good checkpoint "
          f"is step {self._manager.latest_step()} in {self._manager.directory}.")
    return False


class TimedCheckpoint:
  """A forced save once `seconds` have passed since the last save, looked at on each report
  before the last step; process 0's clock decides, so that every host saves the same step."""

  def __init__(self, checkpointer: Checkpointer, seconds: float, every: int, last: int):
    self._checkpointer, self._seconds = checkpointer, seconds
    self.every, self.last = every, last

  def __call__(self, info: StepInfo) -> bool:
    if info.step % self.every or info.step >= self.last:
      return False
    overdue = time.monotonic() - self._checkpointer.last_save >= self._seconds
    if multihost_utils.broadcast_one_to_all(np.asarray(overdue)):
      self._checkpointer.save(info.state, info.step, force=True)
    return False


class PeriodicCheckpoint:
  """A save every `every` steps and at the `last`."""

  def __init__(self, checkpointer: Checkpointer, every: int, last: int):
    self._checkpointer, self.every, self.last = checkpointer, every, last

  def __call__(self, info: StepInfo) -> bool:
    if due(info.step, self.every, self.last):
      self._checkpointer.save(info.state, info.step)
    return False


class Evaluation:
  """Evaluates the params every `every` steps and at the `last`; writes and logs the metrics."""

  def __init__(self, evaluate: Callable[[Any], dict[str, float]], writer: MetricWriter,
               every: int, last: int):
    self._evaluate, self._writer, self.every, self.last = evaluate, writer, every, last
    self.metrics: dict[str, float] = {}  # the latest evaluation's
    self.step: int | None = None  # of the latest evaluation

  def run(self, step: int, params: Any) -> None:
    self.metrics, self.step = self._evaluate(params), step
    self._writer.write(step, self.metrics, "eval")
    log_line(step, self.metrics, "eval")

  def __call__(self, info: StepInfo) -> bool:
    if due(info.step, self.every, self.last):
      self.run(info.step, info.state.params)
    return False


class KeepBest:
  """After each evaluation in the loop, keeps the best params (`BestCheckpoint`) and ends the run
  with a checkpoint once `best.patience` evaluations in a row have not improved on them."""

  def __init__(self, best: BestCheckpoint, evaluation: Evaluation, checkpointer: Checkpointer):
    self._best, self._evaluation, self._checkpointer = best, evaluation, checkpointer

  def __call__(self, info: StepInfo) -> bool:
    if self._evaluation.step != info.step:
      return False
    self._best.update(info.step, info.state.params, self._evaluation.metrics)
    if not self._best.should_stop(info.step):
      return False
    logging.info("early stopping at step %d: no better %s than step %d for %d evaluations",
                 info.step, self._best.metric, self._best.best_step(), self._best.patience)
    self._checkpointer.save_last(info.state, info.step)
    return True


class Profile:
  """A profiler trace of the steps after START up to STOP of `window` (or the run's end; none
  when `window` is None) into `directory`: TensorBoard's logdir, whose profile plugin (or
  Perfetto) shows it. Every host traces its own devices. `closing()` closes a trace the run
  ends inside of."""

  def __init__(self, directory: str, window: tuple[int, int] | None):
    self._directory = directory
    self._start, self._stop = window or (-1, -1)
    self._tracing = False

  def __call__(self, info: StepInfo) -> bool:
    if info.step == self._start:
      jax.profiler.start_trace(self._directory)
      self._tracing = True
    elif info.step == self._stop and self._tracing:
      self._finish(info.metrics)
    return False

  def _finish(self, pending: Any = None) -> None:
    jax.block_until_ready(pending)  # the traced steps' device work, not just their dispatch
    jax.profiler.stop_trace()
    self._tracing = False
    logging.info("profiler trace of steps %d-%d written to %s", self._start + 1, self._stop,
                 self._directory)

  @contextlib.contextmanager
  def closing(self) -> Iterator[None]:
    try:
      yield
    finally:
      if self._tracing:
        self._finish()


class StopSignal:
  """Turns SIGTERM into a request to stop at the next step boundary.

  With several processes, JAX's own preemption notifier (started by
  `jax.distributed.initialize`) catches SIGTERM and `reached_preemption_sync_point`
  makes every host stop at the same step; a Python handler would hide the signal
  from it and let hosts disagree, so none is installed then.
  """

  def __init__(self):
    self.requested = False

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    if jax.process_count() > 1:
      yield
      return
    previous = signal.signal(signal.SIGTERM, self._handle)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving at the next step boundary, then exiting")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


class Preemption:
  """Ends the run with a checkpoint at the step boundary after a SIGTERM (`StopSignal`)."""

  def __init__(self, stop: StopSignal, checkpointer: Checkpointer):
    self._stop, self._checkpointer = stop, checkpointer

  def __call__(self, info: StepInfo) -> bool:
    if not self._stop.should_stop(info.step):
      return False
    self._checkpointer.save_last(info.state, info.step)
    return True
