"""The process's C heap: freed memory handed back to the OS, fresh memory in huge pages."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Mapping

_HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def release_free_heap() -> None:
  """glibc `malloc_trim(0)`: returns free heap pages to the OS; a no-op without glibc.

  XLA's compiler allocates hundreds of MiB in small pieces and frees them when it is done,
  but glibc keeps freed memory in its arenas, so the train step's buffers would be added on
  top of it. Called once the steps are compiled, this lowers the process's resident (and
  peak) memory by that amount: 1,051 -> 772 MiB peak RSS for the bert-tiny MLM step, 2,770 ->
  2,469 MiB for bert-small (session 4, see BENCHMARKS.md).
  """
  trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the process's own C library
  if trim is not None:
    trim(0)


def _glibc_version() -> tuple[int, ...]:
  """(major, minor) of the running glibc; () without glibc."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
  except (AttributeError, ValueError, OSError):
    return ()
  return tuple(int(part) for part in version.split(".")[:2]) if name == "glibc" else ()


def _transparent_hugepages_allowed() -> bool:
  try:
    with open(_THP_MODE) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def hugepage_malloc_env(env: Mapping[str, str]) -> dict[str, str] | None:
  """`env` with GLIBC_TUNABLES asking glibc's malloc to back its memory with transparent huge
  pages, or None where that does not apply: `env` already names the tunable (the user's
  choice; `glibc.malloc.hugetlb=0` opts out), glibc is older than 2.35 or absent, or the
  kernel's transparent huge pages are off."""
  tunables = env.get("GLIBC_TUNABLES", "")
  if (_HUGEPAGE_TUNABLE in tunables or _glibc_version() < (2, 35)
      or not _transparent_hugepages_allowed()):
    return None
  return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [tunables, f"{_HUGEPAGE_TUNABLE}=1"]))}


def restart_with_hugepage_malloc() -> None:
  """Restarts this program (same process id, command line and environment) with
  `hugepage_malloc_env` where it applies; otherwise returns. For programs' `__main__` only,
  before they start work: the process image is replaced.

  XLA:CPU allocates every step's temporaries afresh, hundreds of MiB that glibc maps anew
  each time, so in 4 KiB pages the step faults them all in again every time (the bert-mini
  classification step: 93,632 page faults = its 366 MiB of temporaries, per step). In 2 MiB
  pages that is ~640 faults and the step is 20-30% faster (BENCHMARKS.md). glibc reads its
  tunables only when a process starts, hence the restart.
  """
  env = hugepage_malloc_env(os.environ)
  if env is not None and sys.executable:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # argv[0] as typed: `pkill -f` still matches
