"""9. Keep-N plus keep-every-K leaves exactly the expected steps; a kill while deleting is safe."""

from tests.reliability.conftest import (BASE, EVERY, assert_same_run, committed_steps,
                                        logged_steps, saved_state)

LAST = BASE["train.steps"]


def test_keep_last_n_plus_every_k(trainer, tmp_path):
  keep, every_k = 2, 4
  result = trainer.run(tmp_path / "run", {**BASE, "train.checkpoint_every": 1,
                                          "train.keep_checkpoints": keep,
                                          "train.keep_every": every_k})
  assert result.returncode == 0, result.output[-3000:]
  expected = sorted(set(range(every_k, LAST + 1, every_k)) | set(range(LAST - keep + 1, LAST + 1)))
  assert committed_steps(tmp_path / "run") == expected


def test_kill_while_deleting_an_old_step_keeps_the_newest(trainer, reference, tmp_path):
  workdir, overrides = tmp_path / "run", {**BASE, "train.keep_checkpoints": 2}
  killed = trainer.run(workdir, overrides, fault="kill_in_delete:1")
  assert killed.returncode == -9 and "killed while deleting" in killed.output, killed.output
  newest = 3 * EVERY  # its commit triggered the first deletion (of step EVERY)
  assert newest in committed_steps(workdir)
  assert int(saved_state(workdir, newest)["step"]) == newest
  seen = len(logged_steps(workdir))
  result = trainer.run(workdir, overrides)
  assert result.returncode == 0, result.output[-3000:]
  assert logged_steps(workdir)[seen] == newest + 1
  assert committed_steps(workdir) == [LAST - EVERY, LAST]
  assert_same_run(workdir, reference(BASE))
