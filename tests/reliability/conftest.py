"""Shared helpers of the reliability suite.

Trainers run as `tests.reliability.worker` subprocesses on one CPU device, sharing a
persistent compilation cache, so a launch costs seconds and a kill -9 hits a real
process; the test process only reads their workdirs. Reference (uninterrupted) runs
are made once per session and copied where a test needs to damage one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_TIMEOUT_S = 240  # generous: the box is shared and slow; a hang still ends
EVERY = 3  # checkpoint interval of the base run
BASE = {"train.steps": 12, "train.checkpoint_every": EVERY, "train.keep_checkpoints": 10}
NO_DROPOUT = {**BASE, "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
TMP_MARK = ".orbax-checkpoint-tmp"
_ERROR_LINE = re.compile(r"^(ERROR:|E\d{4} )")


@dataclasses.dataclass
class Result:
  returncode: int
  output: str  # stdout and stderr, interleaved

  def error_lines(self) -> list[str]:
    return [line for line in self.output.splitlines() if _ERROR_LINE.match(line)]


@dataclasses.dataclass
class Launch:
  """A running worker; `finish` waits (bounded) and kills it if it is still alive."""
  proc: subprocess.Popen
  log: Path

  def finish(self, timeout: float = LAUNCH_TIMEOUT_S) -> Result:
    try:
      self.proc.wait(timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait(30)
    return Result(self.proc.returncode, self.log.read_text(errors="replace"))


class Trainer:
  """Launches `tests.reliability.worker` processes with the suite's environment."""

  def __init__(self, env: dict[str, str]):
    self.env, self.launches = env, 0

  def start(self, workdir: Path, overrides: dict[str, Any], fault: str = "",
            read_only: Path | None = None) -> Launch:
    """Starts a worker; with `read_only`, that directory is read-only to it (even as root)."""
    self.launches += 1
    log = Path(f"{workdir}.log{self.launches}")
    command = [sys.executable, "-m", "tests.reliability.worker", str(workdir),
               json.dumps(overrides), *([fault] if fault else [])]
    if read_only is not None:
      read_only.chmod(0o555)
      if os.geteuid() == 0:  # root ignores modes: a read-only bind mount in a private namespace
        command = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && '
                   'mount -o remount,bind,ro "$0" "$0" && exec "$@"', str(read_only), *command]
    with log.open("w") as out:
      proc = subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=out,
                              stderr=subprocess.STDOUT)
    return Launch(proc, log)

  def run(self, workdir: Path, overrides: dict[str, Any], fault: str = "",
          read_only: Path | None = None) -> Result:
    return self.start(workdir, overrides, fault, read_only).finish()


@pytest.fixture(scope="session")
def trainer() -> Trainer:
  # Shared by xdist workers and later sessions: compiling dominates a launch otherwise.
  cache = Path(tempfile.gettempdir()) / "jaxfm-reliability-jax-cache"
  cache.mkdir(exist_ok=True)
  return Trainer({
      **os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
      "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})


@pytest.fixture(scope="session")
def reference(trainer, tmp_path_factory) -> Callable[[dict[str, Any]], Path]:
  """overrides -> the workdir of one uninterrupted run with them (made once per session)."""
  made: dict[str, Path] = {}

  def get(overrides: dict[str, Any]) -> Path:
    key = json.dumps(overrides, sort_keys=True)
    if key not in made:
      workdir = tmp_path_factory.mktemp("reference") / "run"
      result = trainer.run(workdir, overrides)
      assert result.returncode == 0, result.output[-3000:]
      made[key] = workdir
    return made[key]

  return get


def copy_run(source: Path, target: Path) -> Path:
  shutil.copytree(source, target, ignore=shutil.ignore_patterns("tensorboard"))
  return target


def train_losses(workdir: Path) -> dict[int, float]:
  """Per-step training loss from metrics.jsonl; a resumed run's rewrite of a step wins."""
  by_step = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["split"] == "train":
      by_step[record["step"]] = record["loss"]
  return by_step


def logged_steps(workdir: Path) -> list[int]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines()
          if line.endswith("}")]


def checkpoint_entries(workdir: Path) -> list[str]:
  directory = workdir / "checkpoints"
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def committed_steps(workdir: Path) -> list[int]:
  """The steps Orbax lists (committed ones only)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with contextlib.closing(ocp.CheckpointManager(workdir / "checkpoints")) as manager:
    return list(manager.all_steps())


def saved_state(workdir: Path, step: int | None = None) -> dict[str, Any]:
  """The train state saved at `step` (default: the newest) as numpy arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with contextlib.closing(ocp.CheckpointManager(workdir / "checkpoints")) as manager:
    step = manager.latest_step() if step is None else step
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return jax.tree.map(np.asarray, restored["state"])


def assert_trees_equal(a: Any, b: Any) -> None:
  """Bitwise: same structure, dtypes and bytes (NaNs compare equal to themselves)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def assert_same_run(workdir: Path, reference_dir: Path) -> None:
  """Bitwise-equal per-step losses and final train state (params, optimizer, counters)."""
  assert train_losses(workdir) == train_losses(reference_dir)
  assert_trees_equal(saved_state(workdir), saved_state(reference_dir))


@pytest.fixture(scope="session")
def steps_for() -> Callable[..., Any]:
  """(overrides, mesh devices) -> `loop.Steps` in this process (8 devices); nothing compiled."""
  from jaxfm.train import loop  # pylint: disable=g-import-not-at-top
  from tests import train_helpers as th  # pylint: disable=g-import-not-at-top
  from tests.reliability import worker  # pylint: disable=g-import-not-at-top

  def build(overrides: dict[str, Any], devices=None) -> loop.Steps:
    cfg = worker.config(overrides)
    return loop.build_steps(cfg, th.mlm_task(cfg), loop.make_mesh(cfg, devices))

  return build
