"""release_free_heap gives freed C-heap memory back to the OS."""

import ctypes

import pytest

from jaxfm.train import host_memory

_LIBC = ctypes.CDLL(None)


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
  host_memory.release_free_heap()
  after = _resident_mib()
  _LIBC.free(keeper)
  assert before - after > 48, (before, after)
