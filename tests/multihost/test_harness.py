"""The launcher the multi-host tests rely on: bounded waits that fail with each log's tail."""

import pathlib
import sys
import time

import pytest

from tests.multihost import harness as h

_SLEEPER = "import time; print('started', flush=True); time.sleep(100)"


def _dead(pid: int) -> bool:
  """Gone, or a zombie waiting for a reaper (its parent was killed too)."""
  deadline = time.monotonic() + 5
  while time.monotonic() < deadline:
    try:
      if pathlib.Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z":
        return True
    except FileNotFoundError:
      return True
    time.sleep(0.05)
  return False


def test_a_hang_fails_with_every_log_tail_and_kills_the_groups(tmp_path):
  code = ("import os, subprocess, sys, time\n"
          "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(100)'])\n"
          "print('child', child.pid, flush=True)\n"
          "time.sleep(100)")
  with pytest.raises(AssertionError, match="still running after 2 s") as failure:
    with h.launched([sys.executable, "-c", code], 2, 1, tmp_path, "hang") as group:
      group.wait_for(lambda: all("child" in log.read_text() for log in group.logs), "children")
      group.wait(timeout_s=2)
  text = str(failure.value)
  assert "--- process 0" in text and "--- process 1" in text
  children = [int(log.read_text().split()[1]) for log in group.logs]
  assert all(p.poll() is not None for p in group.procs) and all(map(_dead, children))


def test_a_failed_peer_ends_the_wait_early(tmp_path, monkeypatch):
  monkeypatch.setattr(h, "PEER_GRACE_S", 1.0)
  code = ("import os, sys, time\n"
          "if os.environ['JAX_PROCESS_ID'] == '1': print('boom'); sys.exit(3)\n" + _SLEEPER)
  with pytest.raises(AssertionError, match="process 1 exited 3; the others were still running"):
    with h.launched([sys.executable, "-c", code], 2, 1, tmp_path, "peer") as group:
      group.wait()
  assert "boom" in group.logs[1].read_text()


def test_expected_codes_and_each_process_env(tmp_path):
  code = ("import os, sys; e = os.environ\n"
          "print(e['JAX_PROCESS_ID'], e['JAX_NUM_PROCESSES'], e['JAX_COORDINATOR_ADDRESS'], "
          "e['XLA_FLAGS'])\n"
          "sys.exit(int(e['JAX_PROCESS_ID']) + 4)")
  with h.launched([sys.executable, "-c", code], 2, 3, tmp_path, "env") as group:
    assert group.wait(codes=[4, 5]) == [4, 5]
  lines = [log.read_text().split() for log in group.logs]
  assert [l[:2] for l in lines] == [["0", "2"], ["1", "2"]]
  assert lines[0][2] == lines[1][2] and lines[0][2].startswith("127.0.0.1:")
  assert lines[0][3] == "--xla_force_host_platform_device_count=3"
