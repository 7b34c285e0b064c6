"""The process on a CPU-only run: XLA:CPU's flags, glibc's malloc in huge pages, freed heap
handed back to the OS. Measured effects are in BENCHMARKS.md."""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from collections.abc import Mapping

_HUGEPAGE_TUNABLE = "glibc.malloc.hugetlb"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"

# XLA:CPU flags set unless XLA_FLAGS names them. Dots left to XLA's own (Eigen) path rather than
# YNNPACK run attention's batched dots faster from bert-mini's width up; the DFS memory
# scheduler keeps fewer layers' buffers live at once than the default concurrency-optimised
# one. Narrower models run better on XLA's defaults.
DEFAULT_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "reduce",
                     "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
# Older spellings of a default's setting: a user who names one of them has chosen it.
_SAME_SETTING = {"xla_cpu_scheduler_type": ("xla_cpu_enable_concurrency_optimized_scheduler",)}
MIN_WIDTH_FOR_DEFAULT_XLA_FLAGS = 256  # model.hidden_size


def targets_cpu(env: Mapping[str, str] = os.environ) -> bool:
  """Whether JAX will run this process on CPUs, decided before JAX starts its backends:
  JAX_PLATFORMS names cpu first, or no accelerator plugin (libtpu, a `jax_plugins` entry point
  such as CUDA's) is installed."""
  platforms = [p.strip() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
  if platforms:
    return platforms[0] == "cpu"
  return (importlib.util.find_spec("libtpu") is None
          and not importlib.metadata.entry_points(group="jax_plugins"))


def with_default_xla_flags(xla_flags: str, model_width: int | None = None) -> str:
  """`xla_flags` (an XLA_FLAGS value) with `DEFAULT_XLA_FLAGS` for the flags it does not set,
  unless the model is narrower than `MIN_WIDTH_FOR_DEFAULT_XLA_FLAGS` (None: not known)."""
  if model_width is not None and model_width < MIN_WIDTH_FOR_DEFAULT_XLA_FLAGS:
    return " ".join(xla_flags.split())
  named = {flag.lstrip("-").split("=", 1)[0] for flag in xla_flags.split()}
  defaults = [f"--{name}={value}" for name, value in DEFAULT_XLA_FLAGS.items()
              if named.isdisjoint((name, *_SAME_SETTING.get(name, ())))]
  return " ".join([*defaults, *xla_flags.split()])


def use_default_xla_flags(model_width: int | None = None) -> None:
  """Puts `with_default_xla_flags` into the environment when the process `targets_cpu`; acts
  only before JAX starts its backends."""
  if targets_cpu():
    os.environ["XLA_FLAGS"] = with_default_xla_flags(os.environ.get("XLA_FLAGS", ""),
                                                     model_width)


def release_free_heap() -> None:
  """glibc `malloc_trim(0)`: returns free heap pages to the OS; a no-op without glibc.

  XLA's compiler allocates hundreds of MiB in small pieces and frees them when it is done,
  but glibc keeps freed memory in its arenas, so the train step's buffers would be added on
  top of it. Called once the steps are compiled, this lowers the process's resident (and peak)
  memory by that amount.
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
  `hugepage_malloc_env` when it `targets_cpu` and that applies; otherwise returns. For
  programs' `__main__` only, before they start work: the process image is replaced.

  XLA:CPU allocates every step's temporaries afresh, hundreds of MiB that glibc maps anew
  each time; in 4 KiB pages the step faults them all in again every step, in 2 MiB pages
  hardly at all. glibc reads its tunables only when a process starts, hence the restart.
  """
  env = hugepage_malloc_env(os.environ) if targets_cpu() else None
  if env is not None and sys.executable:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)  # argv[0] as typed: `pkill -f` still matches
