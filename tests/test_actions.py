"""The loop's actions alone: each one's cadence and when it ends the run (nothing compiled)."""

import types

import numpy as np
import tqdm

from jaxfm.train import actions


class _Writer:
  def __init__(self):
    self.written = []

  def write(self, step, scalars, prefix):
    self.written.append((step, prefix))
    self.scalars = scalars


class _Saver:
  """Records the saves asked of a `actions.Checkpointer`."""

  def __init__(self):
    self.saves, self.last_save = [], float("-inf")

  def save(self, state, step, force=False):
    self.saves.append((step, force))

  def save_last(self, state, step):
    self.save(state, step, force=True)


def _run(every_step, last):
  """Calls the actions after each of steps 1..`last` as the loop does; the step that ended it."""
  state = types.SimpleNamespace(params="params")
  for step in range(1, last + 1):
    info = actions.StepInfo(step, state, {}, (2, 8))
    if any(action(info) for action in every_step):
      return step
  return None


def test_periodic_work_runs_every_n_steps_and_at_the_last():
  writer, saver = _Writer(), _Saver()
  evaluation = actions.Evaluation(lambda params: {"loss": 1.0}, writer, every=4, last=10)
  assert _run([evaluation, actions.PeriodicCheckpoint(saver, every=3, last=10)], 10) is None
  assert writer.written == [(4, "eval"), (8, "eval"), (10, "eval")]
  assert saver.saves == [(3, False), (6, False), (9, False), (10, False)]


def test_timed_checkpoint_looks_at_reports_before_the_last_step_only():
  saver = _Saver()
  _run([actions.TimedCheckpoint(saver, seconds=1, every=2, last=7)], 7)
  assert saver.saves == [(2, True), (4, True), (6, True)]


class _Best:
  """A `BestCheckpoint` whose only best is step 2's."""
  metric, patience = "loss", 2

  def __init__(self):
    self.updates = []

  def update(self, step, params, metrics):
    self.updates.append(step)

  def best_step(self):
    return 2

  def should_stop(self, step):
    return step - 2 >= self.patience * 2


def test_keep_best_follows_the_evaluations_and_stops_with_a_save():
  writer, saver, best = _Writer(), _Saver(), _Best()
  evaluation = actions.Evaluation(lambda params: {"loss": 1.0}, writer, every=2, last=20)
  evaluation.run(0, "params")  # the loop's step-0 evaluation keeps no best
  assert _run([evaluation, actions.KeepBest(best, evaluation, saver)], 20) == 6
  assert best.updates == [2, 4, 6] and saver.saves == [(6, True)]


def test_preemption_saves_and_stops_at_the_step_after_the_signal():
  stop, saver = actions.StopSignal(), _Saver()
  preemption = actions.Preemption(stop, saver)
  state = types.SimpleNamespace()
  assert not preemption(actions.StepInfo(3, state, {}, (2, 8)))
  stop.requested = True
  assert preemption(actions.StepInfo(4, state, {}, (2, 8))) and saver.saves == [(4, True)]


def test_progress_reports_carry_the_loaders_counters():
  writer, seen = _Writer(), iter([{"examples_seen/wiki": 16}, {"examples_seen/wiki": 32}])
  progress = actions.ReportProgress(
      lambda sums: {"loss": sums["loss_sum"]}, lambda length: 1.0, lambda step: 0.1,
      lambda: 0.0, writer, tqdm.tqdm(disable=True), every=2, last=4, counters=lambda: next(seen))
  state = types.SimpleNamespace(skipped_steps=np.int32(0))
  metrics = {"loss_sum": np.float32(1.0), "grad_norm": np.float32(1.0), "finite": np.bool_(True)}
  for step in (1, 2):
    progress(actions.StepInfo(step, state, metrics, (2, 8)))
  assert writer.written == [(2, "train")] and writer.scalars["examples_seen/wiki"] == 16
  assert writer.scalars["loss"] == 2.0


def test_the_time_in_evaluations_and_saves_is_reported_as_a_share_of_the_loop(caplog):
  import collections
  import time

  class Evaluation:
    def __call__(self, info):
      time.sleep(0.02)
      return False

  class PeriodicCheckpoint:
    def __call__(self, info):
      return True  # ends the run: what follows does not run

  spent, after = collections.Counter(), [Evaluation(), PeriodicCheckpoint(), Evaluation()]
  info = actions.StepInfo(1, None, {}, (2, 8))
  assert actions.run_after_step(after, info, spent) is after[1]
  assert 0.02 <= spent["Evaluation"] < 0.2 and spent["PeriodicCheckpoint"] < 0.01
  with caplog.at_level("INFO"):
    actions.log_time_spent(1.0, collections.Counter(Evaluation=0.04, KeepBest=0.01,
                                                    TimedCheckpoint=0.02))
  assert "training loop 1.0 s, of which evaluation 0.0 s (4.0%), checkpoint saves 0.0 s (3.0%)" \
      in caplog.text
