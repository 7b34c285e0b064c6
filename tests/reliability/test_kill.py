"""2-3. kill -9 at random moments and during a save: nothing committed is lost, runs end bitwise.

Each trial is seeded; it prints its seed and, per kill, the target, the moment, the last
step reached and the step resumed from, so a failure can be replayed (up to timing).
"""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import (BASE, EVERY, LAUNCH_TIMEOUT_S, TMP_MARK, Trainer,
                                        assert_same_run, checkpoint_entries, committed_steps,
                                        logged_steps)

PACE = 0.05  # seconds per batch: a window of ~0.6 s of training per launch
TRIAL = {**BASE, "pace": PACE}
LAST = BASE["train.steps"]


@dataclasses.dataclass
class Kill:
  target: int  # kill once this step is logged (the resume step: during startup/restore/compile)
  delay: float  # seconds after that (after launch, for a startup kill)
  reached: int = -1  # last step logged by the killed process
  resumed: int = -1  # newest committed step afterwards: where the next launch starts
  in_flight: bool = False  # a save was still being written when the kill hit

  def bound(self, async_save: bool) -> int:
    """Steps a kill may cost: one interval, two if an async save was still being written."""
    return 2 * EVERY if async_save and self.in_flight else EVERY

  @property
  def lost(self) -> int:
    return self.reached - self.resumed


def _kill_during(trainer: Trainer, workdir: Path, overrides: dict, kill: Kill,
                 resume: int) -> bool:
  """Runs one launch and SIGKILLs it as `kill` says; False if it finished first."""
  launch = trainer.start(workdir, overrides)
  start, seen = time.monotonic(), len(logged_steps(workdir))
  try:
    while launch.proc.poll() is None and time.monotonic() - start < LAUNCH_TIMEOUT_S:
      new = logged_steps(workdir)[seen:]
      if kill.target == resume and time.monotonic() - start >= kill.delay:
        break
      if kill.target > resume and new and max(new) >= kill.target:
        time.sleep(kill.delay)
        break
      time.sleep(0.005)
    finished = launch.proc.poll() is not None
  finally:
    launch.proc.kill()
    result = launch.finish(30)
  assert finished or result.returncode == -9, result.output[-3000:]
  if finished:
    assert result.returncode == 0, result.output[-3000:]
    return False
  new = logged_steps(workdir)[seen:]
  assert not new or new[0] == resume + 1, (new, resume)  # it resumed where it should have
  kill.reached = max(new) if new else resume
  kill.resumed = max(committed_steps(workdir), default=0)
  kill.in_flight = any(TMP_MARK in name for name in checkpoint_entries(workdir))
  return True


def _trial(trainer: Trainer, reference_dir: Path, workdir: Path, seed: int) -> list[Kill]:
  """Odd seeds save asynchronously (the default), even seeds synchronously."""
  async_save = seed % 2 == 1
  overrides = {**TRIAL, "train.async_checkpointing": async_save}
  rng = random.Random(seed)
  planned, kills, resume = rng.randint(1, 3), [], 0
  while len(kills) < planned:
    target = rng.randint(resume, LAST - 1)
    kill = Kill(target, rng.uniform(0.5, 6.0) if target == resume else rng.uniform(0.0, PACE))
    if not _kill_during(trainer, workdir, overrides, kill, resume):
      break
    kills.append(kill)
    print(f"seed {seed} ({'async' if async_save else 'sync'}) kill {len(kills)}: {kill}")
    resume = kill.resumed
  seen = len(logged_steps(workdir))
  result = trainer.run(workdir, overrides)
  assert result.returncode == 0, result.output[-3000:]
  report = f"seed {seed}: {kills}"
  assert logged_steps(workdir)[seen] == resume + 1, report
  for kill in kills:
    assert kill.lost <= kill.bound(async_save), report
  assert not [n for n in checkpoint_entries(workdir) if TMP_MARK in n], report
  assert_same_run(workdir, reference_dir)
  return kills


SEEDS = [0, *(pytest.param(s, marks=pytest.mark.slow) for s in range(1, 21))]  # 1 fast, 20 slow


@pytest.mark.parametrize("seed", SEEDS)
def test_kill9_at_random_moments(trainer, reference, tmp_path, seed):
  kills = _trial(trainer, reference(BASE), tmp_path / "run", seed)
  print(f"seed {seed}: survived {len(kills)} kills")
  assert kills, "no kill landed: the run finished first"


def test_kill_during_a_save_lists_only_committed_steps(trainer, reference, tmp_path):
  workdir = tmp_path / "run"
  killed = trainer.run(workdir, BASE, fault=f"kill_in_save:{2 * EVERY}")
  assert killed.returncode == -9 and "FAULT: killed while saving" in killed.output, killed.output
  assert committed_steps(workdir) == [EVERY]
  assert [n for n in checkpoint_entries(workdir) if n.startswith(f"{2 * EVERY}{TMP_MARK}")]
  seen = len(logged_steps(workdir))
  result = trainer.run(workdir, BASE)
  assert result.returncode == 0, result.output[-3000:]
  assert logged_steps(workdir)[seen] == EVERY + 1
  assert checkpoint_entries(workdir) == sorted(str(s) for s in range(EVERY, LAST + 1, EVERY))
  assert_same_run(workdir, reference(BASE))
