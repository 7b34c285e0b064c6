"""Process start-up of every entry point: absl, XLA flags, logging, the multi-controller
runtime, the check of gs:// paths, the compilation cache, and the preflight check of the
platform, mesh and batch against the devices."""

from __future__ import annotations

import contextlib
import dataclasses
import logging as logging_std
import os
import signal
import sys
from typing import Any, Callable, Iterator

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm import workdir as workdir_lib
from jaxfm.cpu import process as cpu_process


class _LibraryChatterFilter(logging_std.Filter):
  """Drops INFO records from Orbax/grain/absl internals so the console shows the run itself."""

  _QUIET = ("/orbax/", "/grain/", "/jax/_src/")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in self._QUIET)


@dataclasses.dataclass(frozen=True)
class RunFlags:
  """The flags of a training entry point."""

  config: flags.FlagHolder  # --config=FILE plus --config.a.b=value overrides, locked
  workdir: flags.FlagHolder
  allow_config_change: flags.FlagHolder


def define_run_flags(workdir_help: str) -> RunFlags:
  """Defines --config, --workdir and --allow_config_change (the first two required)."""
  holders = RunFlags(
      config=config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                             lock_config=True),
      workdir=flags.DEFINE_string("workdir", None, workdir_help),
      allow_config_change=flags.DEFINE_bool(
          "allow_config_change", False,
          "Resume even though the config differs from the saved one."))
  flags.mark_flags_as_required(["config", "workdir"])
  return holders


@contextlib.contextmanager
def exit_on(errors: tuple[type[BaseException], ...]) -> Iterator[None]:
  """Turns `errors` (a bad config, workdir, input or checkpoint: the user's to fix) into one
  `error: ...` line on stderr and exit status 1, instead of a traceback."""
  try:
    yield
  except errors as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


# Exit status of a training entry point stopped by SIGTERM after saving (128 + SIGTERM, as a
# process killed by it): not finished, relaunch it to resume. A finished run exits 0 and leaves
# the workdir's DONE marker.
PREEMPTED_EXIT = 143


def finish_training(workdir: str, step: int, preempted: bool) -> None:
  """Ends a training entry point: after a preemption save, exits with `PREEMPTED_EXIT` so a
  supervisor does not take the run for finished; else writes the workdir's DONE marker."""
  if preempted:
    logging.info("saved step %d after SIGTERM; exiting with status %d", step, PREEMPTED_EXIT)
    sys.exit(PREEMPTED_EXIT)
  workdir_lib.mark_done(workdir, step)


def _exit_preempted(signum: int, frame: Any) -> None:  # pylint: disable=unused-argument
  logging.warning("SIGTERM before training started: nothing new to save; exiting with status "
                  "%d (relaunch to resume)", PREEMPTED_EXIT)
  sys.exit(PREEMPTED_EXIT)


def run_program(main: Callable[[list[str]], None]) -> None:
  """`app.run(main)` for an entry point started as a program, after restarting it with glibc's
  malloc in huge pages when it will run on CPUs (`jaxfm.cpu.process`)."""
  cpu_process.restart_with_hugepage_malloc()
  app.run(main)


def initialize_runtime(model_width: int | None = None) -> None:
  """Sets jaxfm's default XLA flags (for a model of hidden size `model_width`, None when not
  known yet), quiets library chatter, starts JAX's multi-controller runtime when asked to.
  Call first thing in an entry point, before JAX is used.

  On a Cloud TPU VM slice set JAXFM_DISTRIBUTED=1 (launch/tpu.sh does) and JAX
  finds the coordinator itself; elsewhere set JAX_COORDINATOR_ADDRESS (host:port of
  process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID. JAX_INIT_TIMEOUT_S (default
  300) bounds how long a process waits for all the others to join.

  Raises:
    ValueError: JAX_COORDINATOR_ADDRESS is set without the other two.
  """
  cpu_process.use_default_xla_flags(model_width)
  logging.get_absl_handler().addFilter(_LibraryChatterFilter())
  timeout_s = int(os.environ.get("JAX_INIT_TIMEOUT_S", "300"))
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
    if missing:
      raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not")
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
      # Cross-process collectives on CPU (local multi-host testing) need gloo.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("process %s of %s joining %s (waits up to JAX_INIT_TIMEOUT_S=%d s)",
                 os.environ["JAX_PROCESS_ID"], os.environ["JAX_NUM_PROCESSES"],
                 os.environ["JAX_COORDINATOR_ADDRESS"], timeout_s)
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]), initialization_timeout=timeout_s)
  elif os.environ.get("JAXFM_DISTRIBUTED") == "1":
    jax.distributed.initialize(initialization_timeout=timeout_s)
  if jax.process_count() == 1:
    # A SIGTERM while restoring or compiling exits as a preempted run does, not as a killed
    # one; the loop takes it over for a save at the step boundary. With several processes
    # JAX's own preemption notifier catches it (see `jaxfm.train.actions.StopSignal`).
    signal.signal(signal.SIGTERM, _exit_preempted)
  if jax.process_index() == 0:
    logging.info("JAX %s: %d process(es), %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)


def use_compilation_cache(workdir: str) -> None:
  """Persists XLA compilations in `WORKDIR/compile_cache`, so a restart (after preemption, or to
  train longer) loads the executables instead of compiling them again. An explicit
  JAX_COMPILATION_CACHE_DIR wins. Entry points only: it sets process-wide JAX config."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      str(workdir_lib.compile_cache_dir(workdir)))


def _string_fields(tree: Any, prefix: str = "") -> dict[str, str]:
  """Every string leaf of a nested dict/list, by dotted name."""
  if isinstance(tree, str):
    return {prefix: tree}
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, (list, tuple)):
    items = enumerate(tree)
  else:
    return {}
  out = {}
  for key, value in items:
    out.update(_string_fields(value, f"{prefix}.{key}" if prefix else str(key)))
  return out


def check_paths(cfg: ml_collections.ConfigDict | None = None, **flag_values: str) -> None:
  """Checks once at start-up that every gs:// path the run names can be opened: the entry
  point's path flags (`workdir=...` for --workdir) and every string field of `cfg` (data files,
  `init_from`, the tokenizer, ...), so a missing gcsfs is one `error:` line, not a traceback.

  Raises:
    WorkdirError: as `workdir.require_gcs_support`.
  """
  named = {f"--{name}": value for name, value in flag_values.items() if value}
  if cfg is not None:
    named.update(_string_fields(cfg.to_dict()))
  workdir_lib.require_gcs_support(named)


def _mesh_fields(cfg: ml_collections.ConfigDict) -> str:
  return ", ".join(f"mesh.{name}={cfg.mesh[name]}" for name in sharding.MESH_AXES)


def run_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """`cfg.mesh` over the devices of this run.

  Raises:
    ConfigError: naming the mesh.* fields when they do not multiply to `jax.device_count()`.
  """
  try:
    return sharding.make_mesh([cfg.mesh[name] for name in sharding.MESH_AXES])
  except ValueError as e:
    raise config_lib.ConfigError(
        f"{_mesh_fields(cfg)} does not match the {jax.device_count()} devices of this run "
        f"({jax.process_count()} process(es) x {jax.local_device_count()} local): {e}") from e


def per_host_batch_size(cfg: ml_collections.ConfigDict) -> int:
  """This process's rows of each `train.batch_size` batch on the run's mesh.

  Raises:
    ConfigError: naming train.batch_size when it does not split over the data-parallel
      shards or the processes (`sharding.local_batch_size`), or the mesh as `run_mesh` does.
  """
  mesh = run_mesh(cfg)
  try:
    return sharding.local_batch_size(cfg.train.batch_size, mesh)
  except ValueError as e:
    raise config_lib.ConfigError(
        f"train.batch_size={cfg.train.batch_size} {e} of {_mesh_fields(cfg)}") from e


def check_platform(cfg: ml_collections.ConfigDict) -> None:
  """Fails when the run came up on another backend than `runtime.platform` asks for: JAX
  registers TPU and GPU backends that fail to start (busy, missing libtpu) quietly and runs on
  CPU. 'auto' (and a saved config without the field) accepts any backend.

  Raises:
    ConfigError: naming the field, with JAX's own reason when the backend is not there.
  """
  want = cfg.get("runtime", {}).get("platform", "auto")
  if want == "auto":
    return
  got = jax.default_backend()
  try:
    jax.devices(want)
    reason = f"JAX's default backend is {got}"
  except RuntimeError as e:
    reason = " ".join(str(e).split())
  if got != want:
    raise config_lib.ConfigError(f"runtime.platform={want!r} but this run came up on {got}: "
                                 f"{reason}")


def preflight(cfg: ml_collections.ConfigDict) -> None:
  """Checks the (validated) platform, `cfg.mesh` and batch against the devices of the run;
  process 0 prints one `topology:` line (processes, local and global devices, the mesh).

  Call after `initialize_runtime` and `config.validate_mesh`.

  Raises:
    ConfigError: as `check_platform` and `per_host_batch_size`.
  """
  check_platform(cfg)
  per_host_batch_size(cfg)
  if jax.process_index() == 0:
    print(f"topology: {sharding.describe(run_mesh(cfg))}", flush=True)
