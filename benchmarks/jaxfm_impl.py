"""The jaxfm side: the real jitted train step of `jaxfm.train.loop.build_steps`."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import numpy as np

from benchmarks import common
from benchmarks.common import NUM_LABELS, VOCAB_SIZE, Case, peak_rss_mib
from jaxfm import sharding
from jaxfm.config import pretrain_defaults
from jaxfm.models import BertConfig, BertForSequenceClassification
from jaxfm.cpu import process as cpu_process
from jaxfm.tasks import classification, mlm
from jaxfm.train import loop
from jaxfm.train.flops import classification_flops_per_token


def model_config(case: Case) -> BertConfig:
  """The jaxfm model config of `case` (vocab 30,522, float32 parameters), with `jaxfm.cpu`'s
  paths where the entry points take them (`model.cpu_paths=auto`: on CPU devices)."""
  return BertConfig(**case.arch, vocab_size=VOCAB_SIZE, max_position_embeddings=case.max_positions,
                    dtype=case.dtype, scan_layers=case.scan_layers, remat_policy=case.remat,
                    cpu_paths=jax.devices()[0].platform == "cpu")


def cpu_case(model: str, task: str, seq: int, batch: int) -> Case:
  """A jaxfm case on this host's CPU, with the XLA flags jaxfm's entry points set for its width.
  Call before JAX starts its backends."""
  arch = common.preset_arch(model)
  jax.config.update("jax_platforms", "cpu")
  cpu_process.use_default_xla_flags(arch["hidden_size"])
  return Case(impl="jaxfm", model=model, task=task, seq=seq, batch=batch, arch=arch)


def classification_task(config: BertConfig, seq_len: int) -> loop.Task:
  """Sequence classification (pooler + linear layer) with `jaxfm.tasks.classification.loss`."""
  model = BertForSequenceClassification(config, NUM_LABELS)
  ids = np.zeros((1, seq_len), np.int32)
  return loop.Task(model=model, init_inputs=(ids, ids, np.ones_like(ids)),
                   loss_fn=classification.loss(model), summarize=mlm.summarize,
                   flops_per_token=functools.partial(classification_flops_per_token, config),
                   batch_spec={"input_ids": ((seq_len,), "int32"),
                               "token_type_ids": ((seq_len,), "int32"),
                               "attention_mask": ((seq_len,), "int32"), "labels": ((), "int32"),
                               "weights": ((), "float32")})


@dataclasses.dataclass
class CompiledStep:
  """The AOT-compiled train step of a case, its state and device batch."""
  compiled: Any  # jax.stages.Compiled: (state, batch) -> (state, metrics)
  state: Any
  batch: Any
  mesh: jax.sharding.Mesh
  compile_s: float
  rss_before_compile_mib: float
  rss_after_compile_mib: float

  def run(self) -> None:
    """One step, blocking until it is done."""
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(metrics)


def compile_train_step(case: Case, batch: dict[str, np.ndarray],
                       model_overrides: Mapping[str, Any] | None = None) -> CompiledStep:
  """Builds the task of `case` (its model config with `model_overrides` applied) and compiles
  its train step ahead of time."""
  if case.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", case.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  config = model_config(case).replace(**(model_overrides or {}))
  if case.task == "mlm":
    task = mlm.mlm_task(config, case.seq, case.predictions)
  else:
    task = classification_task(config, case.seq)
  cfg = pretrain_defaults()
  cfg.train.batch_size = case.batch
  cfg.train.steps = 1_000_000  # the schedule only; no run is this long
  mesh = loop.make_mesh(cfg)
  steps = loop.build_steps(cfg, task, mesh)
  rss_before_compile = peak_rss_mib()
  compiled, compile_s = loop.compile_train_step(  # as `loop.train`
      steps, steps.abstract_batch(task, case.batch), mesh)
  rss_after_compile = peak_rss_mib()
  state = jax.jit(steps.init_state, out_shardings=steps.state_shardings)(jax.random.key(0))
  cpu_process.release_free_heap()  # as `loop.train` does once its state exists
  device_batch = sharding.global_batch({k: batch[k] for k in task.batch_spec}, mesh)
  return CompiledStep(compiled, state, device_batch, mesh, compile_s, rss_before_compile,
                      rss_after_compile)


def measure(case: Case, batch: dict[str, np.ndarray],
            timer: Callable[[Callable[[], None]], dict[str, Any]]) -> dict[str, Any]:
  """Compiles the train step ahead of time, then times it on `batch` (reused every step)."""
  step = compile_train_step(case, batch)
  with sharding.activation_sharding(step.mesh):
    timings = timer(step.run)
  device = jax.devices()[0]
  return {**timings, "compile_s": step.compile_s, "device": device.device_kind,
          "devices": jax.device_count(), "peak_rss_before_compile_mib": step.rss_before_compile_mib,
          "peak_rss_after_compile_mib": step.rss_after_compile_mib}
