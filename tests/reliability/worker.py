"""A trainer to kill: `loop.train` on the synthetic MLM task of tests/train_helpers.py.

  python -m tests.reliability.worker WORKDIR '{"train.steps": 12, "pace": 0.01}' [FAULT]

The JSON object sets dotted config fields; `pace` sleeps that many seconds per batch
(a wider window for timed kills; it does not change the math). FAULT injects one failure:
  kill_in_save:STEP    SIGKILL once step STEP is written but before it is committed (locally
                       its tmp dir is left; on GCS its files without commit_success.txt)
  kill_in_delete:N     SIGKILL halfway through removing the N-th old step (retention)
  fail_save:STEP       the background write of step STEP raises (a failing handler)
  poison:STEP          the batch of step STEP (1-based) has a NaN weight
  crash:STEP           the loader raises while producing the batch of step STEP
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from jaxfm.train import loop
from tests import train_helpers as th


def config(overrides: dict):
  """The tiny test config (no eval) with dotted `overrides` applied; `pace` is ignored."""
  cfg = th.tiny_config(eval_batches=0)
  for key, value in overrides.items():
    if key != "pace":
      section, field = key.split(".")
      cfg[section][field] = value
  return cfg


class Batches(th.RandomMlmBatches):
  """The synthetic batches, optionally slowed down, with one poisoned batch or a crash."""

  def __init__(self, batch_size: int, pace: float, poison: int | None, crash: int | None):
    super().__init__(batch_size)
    self.pace, self.poison, self.crash = pace, poison, crash

  def __next__(self):
    batch = super().__next__()
    time.sleep(self.pace)
    if self.index == self.crash:
      raise RuntimeError(f"injected loader failure at step {self.index}")
    if self.index == self.poison:
      batch["masked_weights"][0, 0] = np.nan
    return batch


def _die(message: str) -> None:
  print(f"FAULT: {message}", flush=True)
  sys.stderr.flush()
  os.kill(os.getpid(), signal.SIGKILL)


def _patch_json_save(step: int, action) -> None:
  """Runs `action(step folder)` before writing the `meta` item of `step`."""
  from orbax.checkpoint._src.handlers import json_checkpoint_handler as json_handler
  handler = json_handler.JsonCheckpointHandler
  original = handler._save_fn  # pylint: disable=protected-access

  async def save_fn(self, x, directory):
    # The step's folder: `<step>.orbax-checkpoint-tmp-*` locally, `<step>` itself on GCS.
    if directory.name.startswith("meta") and directory.parent.name.split(".")[0] == str(step):
      action(directory.parent)
    return await original(self, x, directory)

  handler._save_fn = save_fn  # pylint: disable=protected-access


def _kill_in_save(step: int) -> None:
  """Dies in the commit of `step`'s folder, after Orbax has written every item into it: a
  deterministic half-written step (the items themselves are written concurrently)."""
  from orbax.checkpoint._src.path import atomicity
  for kind in (atomicity.AtomicRenameTemporaryPath, atomicity.CommitFileTemporaryPath):
    original = kind.finalize

    async def finalize(self, *args, _original=original, **kwargs):
      if self._final_path.name == str(step):  # pylint: disable=protected-access
        _die(f"killed while saving step {step} into {self.get()}")
      return await _original(self, *args, **kwargs)

    kind.finalize = finalize


def _fail_save(step: int) -> None:
  def fail(tmp):
    raise OSError(f"injected write failure in {tmp}")
  _patch_json_save(step, fail)


def _kill_in_delete(nth: int) -> None:
  from orbax.checkpoint._src.path import deleter
  original = deleter.PathDeleter.delete
  calls = []

  def delete(self, path, **kwargs):
    calls.append(path)
    if len(calls) == nth:
      files = sorted(str(p) for p in Path(path).rglob("*") if p.is_file())
      for name in files[: len(files) // 2]:
        os.unlink(name)
      _die(f"killed while deleting {path} ({len(files) // 2}/{len(files)} files gone)")
    return original(self, path, **kwargs)

  deleter.PathDeleter.delete = delete


FAULTS = {"kill_in_save": _kill_in_save, "kill_in_delete": _kill_in_delete,
          "fail_save": _fail_save}


def main(argv: list[str]) -> None:
  workdir, overrides = argv[1], json.loads(argv[2])
  kind, _, arg = (argv[3] if len(argv) > 3 else "").partition(":")
  if kind in FAULTS:
    FAULTS[kind](int(arg))
  cfg = config(overrides)
  step = {kind: int(arg)} if kind in ("poison", "crash") else {}
  batches = Batches(cfg.train.batch_size, overrides.get("pace", 0.0), step.get("poison"),
                    step.get("crash"))
  result = loop.train(cfg, workdir, th.mlm_task(cfg), batches, lambda: [], meta={"test": True})
  print(f"DONE step={result.step}", flush=True)


if __name__ == "__main__":
  main(sys.argv)
