"""What every entry point does before training: runtime init, workdir checks, config resolution."""

from __future__ import annotations

import importlib.metadata
import json
import logging as logging_std
import os
from typing import Any, Callable

import jax
import ml_collections
from absl import app, logging
from etils import epath

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm.models import BertConfig, stack_layers, unstack_layers
from jaxfm.cpu import process as cpu_process
from jaxfm.train import checkpoint

_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tokenizers")


class WorkdirError(RuntimeError):
  """The workdir is unusable, or holds a run with a different config."""


class _LibraryChatterFilter(logging_std.Filter):
  """Drops INFO records from Orbax/grain/absl internals so the console shows the run itself."""

  _QUIET = ("/orbax/", "/grain/", "/jax/_src/")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(
        part in record.pathname for part in self._QUIET)


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
  if jax.process_index() == 0:
    logging.info("JAX %s: %d process(es), %d devices (%s)", jax.__version__, jax.process_count(),
                 jax.device_count(), jax.devices()[0].device_kind)


def use_compilation_cache(workdir: str) -> None:
  """Persists XLA compilations in `WORKDIR/compile_cache`, so a restart (after preemption, or to
  train longer) loads the executables instead of compiling them again. An explicit
  JAX_COMPILATION_CACHE_DIR wins. Entry points only: it sets process-wide JAX config."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir",
                      str(checkpoint.absolute(workdir) / "compile_cache"))


def preflight(cfg: ml_collections.ConfigDict) -> None:
  """Checks `cfg.mesh` and the batch against the devices of the run; prints the topology once.

  Call after `initialize_runtime`. Process 0 prints one `topology:` line (processes,
  local and global devices, the resolved mesh).

  Raises:
    ConfigError: naming the mesh.* fields when they do not multiply to `jax.device_count()`,
      or train.batch_size when it does not split over the data-parallel shards.
  """
  config_lib.validate_mesh(cfg)
  shape = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  fields = ", ".join(f"mesh.{name}={size}" for name, size in zip(sharding.MESH_AXES, shape))
  try:
    data, fsdp, _ = sharding.resolve_mesh_shape(shape, jax.device_count())
  except ValueError as e:
    raise config_lib.ConfigError(
        f"{fields} does not match the {jax.device_count()} devices of this run "
        f"({jax.process_count()} process(es) x {jax.local_device_count()} local): {e}") from e
  if cfg.train.batch_size % (data * fsdp):
    raise config_lib.ConfigError(
        f"train.batch_size={cfg.train.batch_size} does not split over the {data * fsdp} "
        f"data-parallel shards (mesh.data x mesh.fsdp) of {fields}")
  mesh = sharding.make_mesh(shape)
  if jax.process_index() == 0:
    print(f"topology: {sharding.describe(mesh)}", flush=True)


def _versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


def prepare_workdir(workdir: str, cfg: ml_collections.ConfigDict, allow_config_change: bool) -> None:
  """Creates the workdir, proves it writable, and guards a resume against a changed config."""
  root = epath.Path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
    checkpoint.probe_write(root)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e}") from e
  saved_file = root / "config.json"
  current = cfg.to_dict()
  if saved_file.exists():
    saved = json.loads(saved_file.read_text())["config"]
    saved.get("model", {}).pop("vocab_size", None)  # resolved from the tokenizer at run time
    compare = json.loads(json.dumps(current))
    compare.get("model", {}).pop("vocab_size", None)
    changes = config_lib.config_changes(saved, compare)
    if changes and not allow_config_change:
      raise WorkdirError(f"{workdir} holds a run with a different config; pass "
                         "--allow_config_change to resume anyway, or use a new workdir:\n  "
                         + "\n  ".join(changes))


def write_resolved_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes the resolved config and package versions to `workdir/config.json` (process 0)."""
  if jax.process_index() == 0:
    root = epath.Path(workdir)
    tmp = root / "config.json.tmp"
    tmp.write_text(json.dumps({"config": cfg.to_dict(), "versions": _versions()}, indent=2))
    tmp.replace(root / "config.json")


def model_config(cfg: ml_collections.ConfigDict) -> BertConfig:
  return BertConfig.from_mapping({**cfg.model, "embedding_size": cfg.model.embedding_size or None})


def per_host_batch_size(cfg: ml_collections.ConfigDict) -> int:
  if cfg.train.batch_size % jax.process_count():
    raise config_lib.ConfigError(f"train.batch_size={cfg.train.batch_size} is not divisible by "
                                 f"the {jax.process_count()} processes")
  return cfg.train.batch_size // jax.process_count()


def read_pretrained(init_from: str, task: str) -> tuple[BertConfig, Any, str | None]:
  """(config, params, tokenizer dir | None) from 'hf:DIR', a jaxfm model dir or a workdir.

  `task` is the interop task for HF folders ("mlm", or "auto" to take the MLM head only
  when the checkpoint has one); a missing head is initialised and reported.
  """
  from jaxfm import interop  # pylint: disable=g-import-not-at-top
  if init_from.startswith("hf:"):
    result = interop.import_hf(init_from[3:], task=task, init_missing_head=True)
    logging.info("init_from %s: initialised %s", init_from, result.initialised or "nothing")
    return result.config, result.params, init_from[3:]
  if (epath.Path(init_from) / "model_config.json").exists():
    return interop.load_model_dir(init_from)
  return checkpoint.load_params(init_from)


def in_layout(params: Any, config: BertConfig) -> Any:
  """`params` (any layout, also an older jaxfm's scanned stack of every layer) in the layer
  layout `config.scan_layers` asks for."""
  params = unstack_layers(params)
  return stack_layers(params) if config.scan_layers else params


def load_initial_params(init_from: str, config: BertConfig, task: str) -> Any:
  """Weights from 'hf:DIR', a jaxfm model dir or a jaxfm workdir, in `config`'s layout."""
  source_config, params, _ = read_pretrained(init_from, task)
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
    if getattr(source_config, field) != getattr(config, field):
      raise config_lib.ConfigError(
          f"init_from={init_from}: its {field}={getattr(source_config, field)} differs from "
          f"model.{field}={getattr(config, field)}")
  return in_layout(params, config)
