"""1. Two fresh runs are bitwise identical, with and without dropout."""

import pytest

from tests.reliability.conftest import BASE, NO_DROPOUT, assert_same_run, train_losses


@pytest.mark.parametrize("overrides", [BASE, NO_DROPOUT], ids=["dropout", "no_dropout"])
def test_two_fresh_runs_are_bitwise_identical(trainer, reference, tmp_path, overrides):
  result = trainer.run(tmp_path / "again", overrides)
  assert result.returncode == 0, result.output[-3000:]
  assert sorted(train_losses(tmp_path / "again")) == list(range(1, overrides["train.steps"] + 1))
  assert_same_run(tmp_path / "again", reference(overrides))


def test_dropout_is_exercised(reference):
  """Guards the test above: with dropout on, the losses really differ from a dropout-free run."""
  with_dropout, without = train_losses(reference(BASE)), train_losses(reference(NO_DROPOUT))
  assert with_dropout[1] != without[1]
