"""7. A NaN batch is skipped bitwise and counted; unskipped, the run stops after a good save."""

import jax
import numpy as np

from tests.reliability.conftest import (BASE, EVERY, assert_trees_equal, committed_steps,
                                        logged_steps, saved_state)

POISON = 5  # the (1-based) step whose batch carries a NaN weight


def test_poisoned_batch_is_skipped_bitwise_and_counted(trainer, tmp_path):
  workdir = tmp_path / "run"
  result = trainer.run(workdir, {**BASE, "train.checkpoint_every": 1, "train.keep_checkpoints": 20},
                       fault=f"poison:{POISON}")
  assert result.returncode == 0, result.output[-3000:]
  before, after = saved_state(workdir, POISON - 1), saved_state(workdir, POISON)
  final = saved_state(workdir)
  assert_trees_equal(before["params"], after["params"])
  assert_trees_equal(before["opt_state"], after["opt_state"])
  assert (int(before["skipped_steps"]), int(after["skipped_steps"])) == (0, 1)
  assert int(final["skipped_steps"]) == 1  # checkpointed, carried to the end
  assert jax.tree.leaves(final["params"])[0].tobytes() != jax.tree.leaves(
      after["params"])[0].tobytes()  # training went on after the skip


def test_without_skipping_nonfinite_steps_stop_the_run_after_a_good_checkpoint(trainer, tmp_path):
  workdir, streak = tmp_path / "run", 3
  result = trainer.run(workdir, {**BASE, "train.skip_nonfinite": False,
                                 "train.max_consecutive_nonfinite": streak},
                       fault=f"poison:{POISON}")
  stop, good = POISON + streak - 1, (POISON - 1) // EVERY * EVERY
  assert result.returncode != 0
  assert f"{streak} consecutive steps up to step {stop} had non-finite loss" in result.output
  assert f"The last good checkpoint is step {good}" in result.output, result.output[-3000:]
  assert committed_steps(workdir) == list(range(EVERY, good + 1, EVERY))
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(saved_state(workdir)["params"]))
  assert max(logged_steps(workdir)) == stop
