"""jaxfm.cpu.process: freed C-heap memory goes back to the OS; programs restart with huge-page malloc."""

import ctypes
import os
import subprocess
import sys

import pytest

from jaxfm.cpu import process

_LIBC = ctypes.CDLL(None)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _resident_mib() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not hasattr(_LIBC, "malloc_trim"), reason="needs glibc's malloc_trim")
def test_freed_heap_blocks_leave_resident_memory_after_release():
  _LIBC.malloc.restype = ctypes.c_void_p
  _LIBC.free.argtypes = [ctypes.c_void_p]
  blocks = [_LIBC.malloc(16 * 1024) for _ in range(4096)]  # 64 MiB, below the mmap threshold
  for block in blocks:
    ctypes.memset(block, 1, 16 * 1024)  # touch every page
  keeper = _LIBC.malloc(16 * 1024)  # above the freed blocks: free() cannot shrink the heap top
  for block in blocks:
    _LIBC.free(block)
  before = _resident_mib()
  process.release_free_heap()
  after = _resident_mib()
  _LIBC.free(keeper)
  assert before - after > 48, (before, after)


@pytest.fixture
def hugepages_apply(monkeypatch):
  """As on a Linux machine with glibc 2.36 and transparent huge pages on `madvise`."""
  monkeypatch.setattr(process, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(process, "_transparent_hugepages_allowed", lambda: True)


def test_hugepage_tunable_is_added_to_the_user_s_tunables(hugepages_apply):
  assert process.hugepage_malloc_env({"HOME": "/h"}) == {
      "HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert process.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}


def test_no_hugepage_tunable_where_the_user_set_it_or_it_cannot_work(hugepages_apply,
                                                                      monkeypatch):
  assert process.hugepage_malloc_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
  monkeypatch.setattr(process, "_glibc_version", lambda: (2, 34))  # no such tunable yet
  assert process.hugepage_malloc_env({}) is None
  monkeypatch.setattr(process, "_glibc_version", lambda: ())  # not glibc
  assert process.hugepage_malloc_env({}) is None
  monkeypatch.setattr(process, "_glibc_version", lambda: (2, 36))
  monkeypatch.setattr(process, "_transparent_hugepages_allowed", lambda: False)
  assert process.hugepage_malloc_env({}) is None


_RESTARTING = """
import os, sys
from jaxfm.cpu import process
print("started", os.getpid(), flush=True)
process.restart_with_hugepage_malloc()
print("running", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:],
      open("/proc/self/cmdline").read().split("\\0")[0])
"""


@pytest.mark.parametrize("user_tunables", ["", "glibc.malloc.hugetlb=0"])
def test_a_program_restarts_itself_once_in_place_with_the_tunable(user_tunables):
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if user_tunables:
    env["GLIBC_TUNABLES"] = user_tunables
  elif process.hugepage_malloc_env(env) is None:
    pytest.skip("needs glibc >= 2.35 and transparent huge pages")
  python = os.path.basename(sys.executable)  # as typed, found on PATH: kept through the restart
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  proc = subprocess.run([python, "-c", _RESTARTING, "--flag=1"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120, check=True)
  lines = proc.stdout.splitlines()
  pid = lines[0].split()[1]
  expected = user_tunables or "glibc.malloc.hugetlb=1"
  assert lines[:-1] == [f"started {pid}"] * (1 if user_tunables else 2)  # the same process
  assert lines[-1] == f"running {pid} {expected} ['--flag=1'] {python}"


def test_cpu_tuning_applies_only_where_jax_will_run_on_cpus(monkeypatch):
  assert process.targets_cpu({"JAX_PLATFORMS": "cpu"})
  assert not process.targets_cpu({"JAX_PLATFORMS": "tpu,cpu"})
  assert not process.targets_cpu({"JAX_PLATFORMS": "cuda"})
  monkeypatch.setattr(process.importlib.util, "find_spec",
                      lambda name: object() if name == "libtpu" else None)
  assert not process.targets_cpu({})  # libtpu installed: a TPU VM
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  process.use_default_xla_flags(768)
  assert process.os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"
