"""Launching local JAX processes (jax.distributed over loopback, gloo on CPU) with bounded waits."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from typing import Callable, Iterator, Sequence

ROOT = pathlib.Path(__file__).resolve().parents[2]
MAX_WAIT_S = 120.0
PEER_GRACE_S = 15.0
_RUNTIME_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
                 "JAXFM_DISTRIBUTED", "XLA_FLAGS")


def free_port() -> int:
  """A loopback TCP port that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Group:
  """`num_processes` processes of one command: process i logs to `log_dir/proc-i.log`.

  Every process leads its own process group, so `kill` reaches its children too.
  """

  def __init__(self, argv: Sequence[str], num_processes: int, devices_per_process: int,
               log_dir: pathlib.Path, name: str):
    self.logs = [log_dir / f"{name}-proc{i}.log" for i in range(num_processes)]
    base = {k: v for k, v in os.environ.items() if k not in _RUNTIME_VARS}
    base.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_INIT_TIMEOUT_S="60",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    port = free_port()
    self.procs: list[subprocess.Popen] = []
    for i, log in enumerate(self.logs):
      env = dict(base)
      if num_processes > 1:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(i))
      with log.open("w") as out:
        self.procs.append(subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=out,
                                           stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True))

  def tails(self, lines: int = 30) -> str:
    parts = []
    for i, (proc, log) in enumerate(zip(self.procs, self.logs)):
      text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
      parts.append(f"--- process {i} (pid {proc.pid}, exit {proc.poll()}), {log}:\n"
                   + "\n".join(text))
    return "\n".join(parts)

  def fail(self, why: str) -> None:
    self.kill()
    raise AssertionError(f"{why}\n{self.tails()}")

  def wait(self, timeout_s: float = MAX_WAIT_S, codes: Sequence[int] | None = None) -> list[int]:
    """Exit codes once all processes end; a hang past `timeout_s` (at most 120 s) fails.

    Once one process exits with an unexpected code, the others get `PEER_GRACE_S` to end
    (a peer of a failed process usually blocks in a collective) before the test fails.

    Args:
      codes: the expected exit codes (default: all 0); a mismatch fails with the logs' tails.
    """
    want = [0] * len(self.procs) if codes is None else list(codes)
    deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
    why = f"processes still running after {min(timeout_s, MAX_WAIT_S):.0f} s"
    while any(p.poll() is None for p in self.procs):
      if time.monotonic() > deadline:
        self.fail(why)
      failed = [i for i, (p, w) in enumerate(zip(self.procs, want)) if p.poll() not in (None, w)]
      if failed and time.monotonic() + PEER_GRACE_S < deadline:
        deadline = time.monotonic() + PEER_GRACE_S
        why = (f"process {failed[0]} exited {self.procs[failed[0]].returncode}; the others "
               f"were still running {PEER_GRACE_S:.0f} s later")
      time.sleep(0.1)
    got = [p.returncode for p in self.procs]
    if got != want:
      self.fail(f"exit codes {got}, expected {want}")
    return got

  def wait_for(self, condition: Callable[[], bool], what: str,
               timeout_s: float = MAX_WAIT_S) -> float:
    """Polls `condition` until true (returns the seconds waited); fails if a process exits first."""
    start = time.monotonic()
    while not condition():
      if any(p.poll() is not None for p in self.procs):
        self.fail(f"a process exited while waiting for {what}")
      if time.monotonic() - start > min(timeout_s, MAX_WAIT_S):
        self.fail(f"timed out after {min(timeout_s, MAX_WAIT_S):.0f} s waiting for {what}")
      time.sleep(0.05)
    return time.monotonic() - start

  def signal(self, index: int, signum: int) -> None:
    os.kill(self.procs[index].pid, signum)

  def kill(self) -> None:
    """SIGKILLs every process group that is still there."""
    for proc in self.procs:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    for proc in self.procs:
      with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


@contextlib.contextmanager
def launched(argv: Sequence[str], num_processes: int, devices_per_process: int,
             log_dir: pathlib.Path, name: str) -> Iterator[Group]:
  """A `Group` whose process groups are all killed on exit, whatever happened."""
  group = Group(argv, num_processes, devices_per_process, log_dir, name)
  try:
    yield group
  finally:
    group.kill()


@contextlib.contextmanager
def exclusive(path: pathlib.Path, timeout_s: float = MAX_WAIT_S) -> Iterator[None]:
  """Holds an flock on `path` (pytest-xdist workers share it); waiting past `timeout_s` fails."""
  with path.open("a") as f:
    deadline = time.monotonic() + min(timeout_s, MAX_WAIT_S)
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise AssertionError(f"another pytest worker held {path} for over "
                               f"{min(timeout_s, MAX_WAIT_S):.0f} s") from None
        time.sleep(0.2)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def pretrain_argv(workdir: pathlib.Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "jaxfm.pretrain", f"--workdir={workdir}", *overrides]


def records(workdir: pathlib.Path, split: str) -> dict[int, dict[str, float]]:
  """metrics.jsonl by step for `split`; a resumed run's rewrite of a step wins."""
  path = workdir / "metrics.jsonl"
  out = {}
  if path.exists():
    for line in path.read_text().split("\n")[:-1]:  # complete lines only: a writer may be mid-line
      if line.strip():
        record = json.loads(line)
        if record["split"] == split:
          out[record["step"]] = record
  return out


def committed_steps(workdir: pathlib.Path) -> list[int]:
  """Checkpoint steps Orbax has finalised (temporary directories are not digits)."""
  root = workdir / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []
