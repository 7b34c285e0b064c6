"""Orbax checkpoints of the train state, loader state and run metadata.

Every host calls the same functions (Orbax coordinates multi-host writes), and all hosts
agree on the outcome of each restore before any moves on, so a read that fails on some hosts
only is handled like one that fails everywhere instead of leaving the others at a barrier.
A step whose save did not finish is incomplete, not damaged: on a local disk it is a
`<step>.orbax-checkpoint-tmp-*` folder; on an object store (gs://) Orbax writes into `<step>/`
itself and marks completion with a `commit_success.txt`, so a step without it is skipped with
one WARNING and removed by Orbax. A step that is damaged (a file missing, truncated or unparseable, an empty step
directory) is quarantined: renamed `<step>.corrupt`, never deleted, never retried,
with one ERROR line naming the step, the file and the action; the previous step
is tried. If checkpoints exist but none restores, we refuse to start rather than
silently training from scratch. Uncommitted temporary directories left by a kill
are removed when the manager opens the directory, and an asynchronous save that
fails raises `CheckpointError` at the next save or wait instead of only being logged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging as std_logging
import re
import sys
import traceback
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from jaxfm.workdir import checkpoint_dir, probe_write

STATE, DATA, META = "state", "data", "meta"
QUARANTINE = ".corrupt"
_COMMIT_MARKER = "commit_success.txt"  # Orbax's, written last into a step on an object store
# The files a committed step must hold (relative to the step dir), and whether each is JSON.
_REQUIRED = (("_CHECKPOINT_METADATA", True), (f"{STATE}/_METADATA", True),
             (f"{STATE}/manifest.ocdbt", False), (f"{DATA}/metadata", True),
             (f"{META}/metadata", True))


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected, or a checkpoint could not be written."""


@dataclasses.dataclass(frozen=True)
class _FailedRead:
  """What an item's restore returns instead of raising (see `_failures_returned`)."""
  error: BaseException


def _failures_returned(handler: Any) -> Any:
  """`handler`, whose restore returns `_FailedRead` instead of raising: the process then still
  reaches the barrier that ends Orbax's restore, where its peers wait, and shares the failure
  with them afterwards (`_failed_processes`). The instance's method is wrapped, not the class
  subclassed: Orbax pairs handlers with their arguments by exact class."""
  restore = handler.restore

  def restore_or_failure(*args, **kwargs):
    try:
      return restore(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to read the item makes the step unusable
      return _FailedRead(e)

  handler.restore = restore_or_failure
  return handler


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: Any  # loader iterator state (JSON)
  meta: dict[str, Any]


class Manager(ocp.CheckpointManager):
  """Orbax's manager, but a failed asynchronous save raises instead of only being logged.

  Orbax logs a failed background commit and carries on (the step never appears); we
  check after every wait, which Orbax also runs at the start of each save, so the
  error surfaces within one checkpoint interval and at the final wait.
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._unconfirmed: int | None = None

  def save(self, step: int, *args, **kwargs) -> bool:
    started = super().save(step, *args, **kwargs)
    if started:
      self._unconfirmed = step
    return started

  def wait_until_finished(self) -> None:
    step, self._unconfirmed = self._unconfirmed, None
    try:
      super().wait_until_finished()
    except Exception as e:  # noqa: BLE001 - whatever the background write raised
      raise self._failed(step, f"{type(e).__name__}: {_first_line(e)}") from e
    if step is not None:
      self.reload()
      if step not in self.all_steps():
        raise self._failed(step, "the cause is logged above")

  def _failed(self, step: int | None, cause: str) -> CheckpointError:
    return CheckpointError(
        f"saving checkpoint step {step} in {self.directory} failed ({cause}); the newest "
        f"committed step is {self.latest_step()}. Check that the directory is writable and "
        "has space, then rerun to resume from there.")


def make_manager(workdir: str, keep: int, keep_every: int = 0,
                 async_save: bool = True) -> Manager:
  """A manager keeping the newest `keep` steps plus every step divisible by `keep_every` (> 0).

  Damaged steps are quarantined first (see `quarantine_damaged`), so neither Orbax
  nor a restore trips over them.
  """
  directory = checkpoint_dir(workdir)
  quarantine_damaged(directory)  # every process takes part in its sync point
  directory.mkdir(parents=True, exist_ok=True)
  _probe_writable(directory)
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
      create=True, cleanup_tmp_directories=True)
  handlers = {STATE: _failures_returned(ocp.StandardCheckpointHandler()),
              DATA: _failures_returned(ocp.JsonCheckpointHandler()),
              META: _failures_returned(ocp.JsonCheckpointHandler())}  # also for `item_metadata`
  return Manager(directory, options=options, item_names=(STATE, DATA, META),
                 item_handlers=handlers)


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         meta: dict[str, Any], force: bool = False) -> bool:
  """Starts an (async) save of `step`; returns whether a save was started.

  Raises:
    CheckpointError: this save could not start, or the previous one failed.
  """
  _probe_writable(manager.directory)
  try:
    return manager.save(step, args=ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: ocp.args.JsonSave(data_state),
        META: ocp.args.JsonSave(meta),
    }), force=force)
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001 - whatever Orbax or the filesystem raised
    raise CheckpointError(f"saving checkpoint step {step} in {manager.directory} failed: "
                          f"{type(e).__name__}: {_first_line(e)}") from e


@contextlib.contextmanager
def finishing(manager: ocp.CheckpointManager) -> Iterator[None]:
  """Waits for the last save and closes `manager` on the way out, also when the body raises.

  A save error on the way out replaces a clean exit but not an exception already raised.
  """
  try:
    yield
  except BaseException:
    try:
      manager.close()
    except Exception as e:  # noqa: BLE001 - the body's exception is the one to report
      logging.error("%s", e)
    raise
  manager.close()


def _probe_writable(directory: epath.Path) -> None:
  """Raises CheckpointError now if `directory` takes no writes.

  Orbax creates a step's directory in the background; when that fails its commit
  threads wait minutes for a signal that never comes, so we check synchronously.
  """
  if jax.process_index() != 0:
    return
  try:
    probe_write(directory)
  except OSError as e:
    raise CheckpointError(f"checkpoint directory {directory} is not writable: {e}") from e


def _first_line(e: BaseException) -> str:
  return (str(e).splitlines() or [""])[0][:300]


class _UnretrievedReadErrors(std_logging.Filter):
  """Drops asyncio's "exception was never retrieved" records: a failed Orbax read leaves its
  futures' errors unretrieved, and asyncio logs each at ERROR when they are collected."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


_UNRETRIEVED_READ_ERRORS = _UnretrievedReadErrors()


def _is_late_read(unraisable: Any) -> bool:
  """A read that finished after its failed restore had closed the event loop: tensorstore
  reports each such callback's RuntimeError as unraisable (hundreds per failed restore)."""
  return (unraisable.exc_type is RuntimeError
          and str(unraisable.exc_value) == "Event loop is closed"
          and any(frame.f_code.co_name == "call_soon_threadsafe"
                  for frame, _ in traceback.walk_tb(unraisable.exc_traceback)))


class _LateReadsDropped:
  """`sys.unraisablehook` that passes on everything but `_is_late_read` reports."""

  def __init__(self, hook: Callable[[Any], Any]):
    self.hook = hook

  def __call__(self, unraisable: Any) -> None:
    if not _is_late_read(unraisable):
      self.hook(unraisable)


def _quiet_failed_reads() -> None:
  """Keeps the quarantine's line the only output about a failed restore; idempotent.

  Installed before restoring: the failed reads report on other threads, at times nobody
  chooses, and their tracebacks would bury and even split that ERROR line.
  """
  std_logging.getLogger("asyncio").addFilter(_UNRETRIEVED_READ_ERRORS)  # idempotent
  if not isinstance(sys.unraisablehook, _LateReadsDropped):
    sys.unraisablehook = _LateReadsDropped(sys.unraisablehook)


def _steps_on_disk(directory: epath.Path) -> list[epath.Path]:
  return sorted((p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()),
                key=lambda p: int(p.name))


def _committed(step_dir: epath.Path) -> bool:
  """Whether the save of `step_dir` finished, by Orbax's own rule for its file system (on
  gs://, the `commit_success.txt` it writes last)."""
  return ocp.path.step.is_path_finalized(step_dir)


def _damage(step_dir: epath.Path) -> tuple[str, str] | None:
  """(file, problem) for the first required file that is missing or unparseable, else None."""
  if not any(step_dir.iterdir()):
    return str(step_dir), "the step directory is empty"
  for name, is_json in _REQUIRED:
    path = step_dir / name
    if not path.exists():
      return str(path), "missing"
    if is_json:
      try:
        json.loads(path.read_text())
      except (ValueError, UnicodeDecodeError) as e:
        return str(path), f"not valid JSON ({e})"
  return None


def _damaged_array(step_dir: epath.Path, error: BaseException) -> str:
  """Where in `step_dir` a failed restore broke: an array of the state, or the step itself."""
  arrays = re.findall(r"'path': '([^'/][^']*?)/?'", str(error))
  return f"{step_dir / STATE} (array {arrays[-1]})" if arrays else str(step_dir)


def _free_name(step_dir: epath.Path) -> epath.Path:
  """`<step>.corrupt`, or `<step>.corrupt<n>` with the first n no folder has."""
  target, suffix = step_dir.parent / f"{step_dir.name}{QUARANTINE}", 0
  while target.exists():
    suffix += 1
    target = step_dir.parent / f"{step_dir.name}{QUARANTINE}{suffix}"
  return target


def _quarantine(step_dir: epath.Path, file: str, problem: str) -> epath.Path:
  """Renames a damaged step out of Orbax's sight and logs the one ERROR line about it.

  gcsfs moves a gs:// folder object by object, and a move it retries after a lost answer finds
  its object already moved (FileNotFoundError) with the rest still in place: those then move to
  the next free name, so the step still leaves Orbax's sight whole."""
  target = _free_name(step_dir)
  if jax.process_index() == 0:
    for attempt in range(3):
      try:
        if step_dir.exists():
          step_dir.rename(_free_name(step_dir) if attempt else target)
        break
      except FileNotFoundError:
        if attempt == 2:
          raise
  logging.error("checkpoint step %s is damaged: %s: %s; quarantined it as %s (not deleted, "
                "will not be retried) and falling back to the previous step",
                step_dir.name, file, problem, target)
  return target


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _failed_processes(failed: bool) -> list[int]:
  """The processes where an attempt every process made failed; all processes call this and get
  the same answer, so none goes on while another falls back."""
  if jax.process_count() == 1:
    return [0] if failed else []
  flags = np.asarray(multihost_utils.process_allgather(np.array([failed], np.int32)))
  return [int(i) for i in np.flatnonzero(flags.reshape(-1))]


def quarantine_damaged(directory: epath.Path) -> None:
  """Quarantines every committed step directory that lacks a required file or holds garbage
  metadata; names each uncommitted one (a save that did not finish) in a WARNING and leaves it
  to Orbax, which ignores it and removes it when the manager opens.

  Process 0 inspects and renames; every process must call this (it ends in a sync point).
  """
  if jax.process_index() == 0 and directory.exists():
    for step_dir in _steps_on_disk(directory):
      if not _committed(step_dir):
        logging.warning("checkpoint step %s has no %s: its save did not finish; skipping it as "
                        "incomplete (Orbax removes %s)", step_dir.name, _COMMIT_MARKER, step_dir)
        continue
      found = _damage(step_dir)
      if found:
        _quarantine(step_dir, *found)
  _sync("jaxfm-checkpoint-quarantine")


def _check_target(abstract_state: Any) -> None:
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  missing = [jax.tree_util.keystr(path) or "the root" for path, leaf in leaves
             if getattr(leaf, "sharding", None) is None] or ([] if leaves else ["any array"])
  if missing:
    raise CheckpointError(
        f"restore target has no sharding for {len(missing)} arrays (e.g. {missing[0]}): pass "
        "shape/dtype/sharding structs for this mesh, `loop.build_steps(cfg, task, mesh)"
        ".abstract_state` or `checkpoint.abstract_like(state, state_shardings)`")


def _param_shapes(params: Any) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def _other_model(manager: ocp.CheckpointManager, step: int, params: Any) -> str | None:
  """How the parameters saved at `step` differ from `params` (None: same names and shapes,
  or the step's metadata is unreadable, which the restore then reports as damage)."""
  try:
    saved = _param_shapes(manager.item_metadata(step)[STATE]["params"])
  except Exception:  # noqa: BLE001 - damaged metadata: the restore decides
    return None
  wanted = _param_shapes(params)
  if saved == wanted:
    return None
  only_saved, only_here = sorted(saved.keys() - wanted.keys()), sorted(wanted.keys() - saved.keys())
  if only_saved or only_here:
    return (f"{len(only_saved)} parameters only in the checkpoint "
            f"({', '.join(only_saved[:2]) or 'none'}), {len(only_here)} only in this run's model "
            f"({', '.join(only_here[:2]) or 'none'})")
  name = next(k for k in sorted(wanted) if saved[k] != wanted[k])
  return f"{name} is {saved[name]} in the checkpoint and {wanted[name]} in this run's model"


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
  """Restores the newest readable step into `abstract_state`'s shapes and shardings.

  Returns None when the workdir holds no checkpoint at all.

  Raises:
    CheckpointError: `abstract_state` lacks shardings; the newest step holds another model's
      parameters (left as it is); or checkpoints (possibly only quarantined ones) exist but
      none restores.
  """
  _check_target(abstract_state)
  _quiet_failed_reads()
  for step in sorted(manager.all_steps(), reverse=True):
    difference = _other_model(manager, step, abstract_state.params)
    if difference:
      raise CheckpointError(
          f"checkpoint step {step} in {manager.directory} was written for another model: "
          f"{difference}. Did the model config change (e.g. model.scan_layers, num_layers), or "
          "was it written by an older jaxfm whose scanned layout stacked every layer (the last "
          "now stays layer_{L-1})? Resume with the model it was written for or use a new "
          "workdir; the checkpoint is left untouched.")
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: ocp.args.JsonRestore(),
          META: ocp.args.JsonRestore(),
      }))
      error = next((r.error for r in restored.values() if isinstance(r, _FailedRead)), None)
    except Exception as e:  # noqa: BLE001 - any failure to read a step means it is unusable
      error = e
    failed_on = _failed_processes(error is not None)
    if not failed_on:
      return Restored(step=step, state=restored[STATE], data=restored[DATA], meta=restored[META])
    step_dir = manager.directory / str(step)
    if error is not None:
      _quarantine(step_dir, _damaged_array(step_dir, error),
                  f"restore failed with {type(error).__name__}: {_first_line(error)}")
    else:  # read here, not on every process
      _quarantine(step_dir, str(step_dir), f"restore failed on process(es) "
                  f"{', '.join(map(str, failed_on))} (their logs name the cause)")
    restored = error = None  # its traceback holds the failed read's futures:
    gc.collect()  # free them now, quietly
    _sync(f"jaxfm-checkpoint-restore-{step}")
    manager.reload()
  found = sorted(p.name for p in manager.directory.iterdir()) if manager.directory.exists() else []
  if any(QUARANTINE in name for name in found):
    raise CheckpointError(
        f"{manager.directory} holds checkpoints but none can be restored; refusing to start "
        f"from scratch over them. Found: {', '.join(found)}. Move them away to start anew.")
  return None


def read_data_state(manager: ocp.CheckpointManager, step: int) -> Any | None:
  """The loader state saved with `step` alone (small JSON), or None when it does not read:
  `restore_latest` then deals with the damaged step."""
  try:
    data = manager.restore(step, args=ocp.args.Composite(**{DATA: ocp.args.JsonRestore()}))[DATA]
  except Exception:  # noqa: BLE001 - any failure: the step is restore_latest's to judge
    return None
  return None if isinstance(data, _FailedRead) else data


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`, the restore target Orbax needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def on_first_device(metadata: Any) -> Any:
  """Restore target for a saved tree's metadata: each array whole on this process's first
  device, whatever topology wrote the checkpoint."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                      metadata)


def restore_latest_params(workdir: str) -> tuple[int, Any]:
  """(step, params as numpy) of a workdir's newest checkpoint, whatever topology wrote it."""
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=(STATE, DATA, META),
                                  item_handlers={STATE: ocp.StandardCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{workdir} holds no checkpoint")
  target = on_first_device(manager.item_metadata(step)[STATE])
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardRestore(target)}))
  manager.close()
  return step, jax.device_get(restored[STATE]["params"])
