"""8. A failing asynchronous save is an error within one checkpoint interval, exit code != 0."""

import pytest

from tests.reliability.conftest import BASE, EVERY, committed_steps, logged_steps

LAST = BASE["train.steps"]


@pytest.mark.parametrize("step", [2 * EVERY, LAST], ids=["mid_run", "final_save"])
def test_failing_handler_fails_the_run(trainer, tmp_path, step):
  workdir = tmp_path / "run"
  result = trainer.run(workdir, BASE, fault=f"fail_save:{step}")
  assert result.returncode != 0
  assert f"saving checkpoint step {step} in {workdir / 'checkpoints'} failed" in result.output, (
      result.output[-3000:])
  assert max(logged_steps(workdir)) <= step + EVERY  # surfaced by the next save at the latest
  assert committed_steps(workdir) == list(range(EVERY, step, EVERY))


def test_read_only_checkpoint_dir_fails_the_run(trainer, tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  result = trainer.run(workdir, BASE, read_only=workdir / "checkpoints")
  assert result.returncode != 0
  assert f"checkpoint directory {workdir / 'checkpoints'} is not writable" in result.output, (
      result.output[-3000:])
  assert logged_steps(workdir) == []  # found before the first step
  assert committed_steps(workdir) == []


def test_a_crash_still_waits_for_the_save_in_flight(trainer, tmp_path):
  """The loader dies right after a save started: that save still commits, the process exits."""
  workdir = tmp_path / "run"
  result = trainer.run(workdir, BASE, fault=f"crash:{2 * EVERY + 1}")
  assert result.returncode != 0 and "injected loader failure" in result.output
  assert committed_steps(workdir) == [EVERY, 2 * EVERY]
