"""4. A damaged newest checkpoint is quarantined with one ERROR line; the run resumes bitwise."""

import shutil
import sys
import types
from pathlib import Path
from typing import Callable

import pytest

from jaxfm.train import checkpoint
from tests.reliability.conftest import (BASE, EVERY, assert_same_run, checkpoint_entries,
                                        committed_steps, copy_run, logged_steps)

LAST = BASE["train.steps"]


def _files(step_dir: Path) -> list[Path]:
  """The step's files, largest first (the big ones hold array data)."""
  return sorted((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: -p.stat().st_size)


def _truncate(step_dir: Path) -> str:
  # Every array data file: which one is the largest depends on how the async save split the
  # arrays, and a file the restore does not read would go unnoticed.
  for victim in (p for p in _files(step_dir) if p.parent.name == "d"):
    with victim.open("r+b") as f:
      f.truncate(victim.stat().st_size // 2)
  return "state"  # tensorstore names the array, not the chunk file


def _delete(step_dir: Path) -> str:
  victim = next(p for p in _files(step_dir) if p.parent.name == "d")
  victim.unlink()
  return "state"


def _garbage_metadata(step_dir: Path) -> str:
  (step_dir / "_CHECKPOINT_METADATA").write_bytes(b"\x00\xffnot json{")
  return "_CHECKPOINT_METADATA"


def _empty(step_dir: Path) -> str:
  for path in sorted(step_dir.rglob("*"), key=lambda p: -len(p.parts)):
    path.rmdir() if path.is_dir() else path.unlink()
  return str(step_dir)


CORRUPTIONS: dict[str, Callable[[Path], str]] = {
    "truncated_data_file": _truncate, "deleted_file": _delete,
    "garbage_metadata": _garbage_metadata, "empty_step_dir": _empty}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_damaged_newest_step_is_quarantined_and_the_run_resumes_bitwise(trainer, reference,
                                                                        tmp_path, kind):
  workdir = copy_run(reference(BASE), tmp_path / "run")
  named = CORRUPTIONS[kind](workdir / "checkpoints" / str(LAST))
  before = len(logged_steps(workdir))
  result = trainer.run(workdir, BASE)
  assert result.returncode == 0, result.output[-3000:]
  errors = result.error_lines()
  assert len(errors) == 1, errors
  assert f"checkpoint step {LAST} is damaged" in errors[0] and named in errors[0]
  assert f"quarantined it as {workdir / 'checkpoints' / f'{LAST}.corrupt'}" in errors[0]
  assert logged_steps(workdir)[before] == LAST - EVERY + 1  # resumed from the previous step
  assert f"{LAST}.corrupt" in checkpoint_entries(workdir)  # kept, renamed
  assert committed_steps(workdir) == list(range(EVERY, LAST + 1, EVERY))  # the bad one not listed
  assert_same_run(workdir, reference(BASE))


def test_a_damaged_unfinished_newest_step_resumes_bitwise_from_the_one_before(trainer, reference,
                                                                             tmp_path):
  # The newest step's loader state reads but its arrays do not: the batch fetched for it (whose
  # step the loop compiles before any state exists) is dropped, and the run goes on from the
  # step before with that step's own batches.
  workdir = copy_run(reference(BASE), tmp_path / "run")
  shutil.rmtree(workdir / "checkpoints" / str(LAST))
  newest = LAST - EVERY
  _truncate(workdir / "checkpoints" / str(newest))
  before = len(logged_steps(workdir))
  result = trainer.run(workdir, BASE)
  assert result.returncode == 0, result.output[-3000:]
  errors = result.error_lines()
  assert len(errors) == 1 and f"checkpoint step {newest} is damaged" in errors[0], errors
  assert logged_steps(workdir)[before] == newest - EVERY + 1
  assert_same_run(workdir, reference(BASE))


# Orbax leaves the failed reads' futures unretrieved; that is noise, not the behaviour under test.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_restorable_checkpoint_refuses_to_start(reference, tmp_path, steps_for):
  workdir = copy_run(reference(BASE), tmp_path / "run")
  steps = sorted(committed_steps(workdir))
  for i, step in enumerate(steps):
    list(CORRUPTIONS.values())[i % len(CORRUPTIONS)](workdir / "checkpoints" / str(step))
  abstract = steps_for(BASE).abstract_state
  for attempt in ("first", "again, all already quarantined"):
    with pytest.raises(checkpoint.CheckpointError, match="refusing to start from scratch") as e:
      checkpoint.restore_latest(checkpoint.make_manager(str(workdir), 3), abstract)
    assert all(f"{s}.corrupt" in str(e.value) for s in steps), (attempt, e.value)
  assert checkpoint_entries(workdir) == sorted(f"{s}.corrupt" for s in steps)


# The gc.collect() also frees coroutines an earlier in-process failed restore left behind.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_a_failed_reads_unretrieved_futures_log_no_error(caplog, monkeypatch):
  import asyncio
  import gc
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # undone after the test
  loop = asyncio.new_event_loop()
  future = loop.create_future()
  future.set_exception(OSError("truncated chunk"))  # as a failed Orbax read leaves it
  cycle = [future]
  cycle.append(cycle)  # only the garbage collector frees it, at a time nobody chooses
  del future, cycle
  checkpoint._quiet_failed_reads()
  gc.collect()
  loop.close()
  assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text


def test_a_read_finishing_after_its_loop_closed_reports_nothing_but_others_report(monkeypatch):
  import asyncio
  reported: list[str] = []
  monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(str(u.exc_value)))
  checkpoint._quiet_failed_reads()
  checkpoint._quiet_failed_reads()  # idempotent: one filter, not two
  assert not isinstance(sys.unraisablehook.hook, type(sys.unraisablehook))

  def report(call: Callable[[], None]) -> None:
    try:
      call()
    except RuntimeError as e:
      sys.unraisablehook(types.SimpleNamespace(  # the fields of sys.UnraisableHookArgs
          exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__, err_msg=None, object=None))

  loop = asyncio.new_event_loop()
  loop.close()
  report(lambda: loop.call_soon_threadsafe(print))  # a read ending after its failed restore
  assert reported == []

  def elsewhere() -> None:
    raise RuntimeError("Event loop is closed")

  report(elsewhere)  # the same text from anywhere else is still reported
  assert reported == ["Event loop is closed"]
