"""The one training loop: pretraining and every fine-tuning task run through `train`."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from jaxfm import sharding
from jaxfm.cpu import process as cpu_process
from jaxfm.train import checkpoint, optim
from jaxfm.train.best import BestCheckpoint
from jaxfm.train.flops import peak_flops_per_device
from jaxfm.train.state import TrainState, create_train_state
from jaxfm.train.step import LossFn, Sums, make_eval_step, make_train_step
from jaxfm.train.writer import MetricWriter, log_line

LocalBatch = dict[str, np.ndarray]


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with non-finite loss or gradients."""


class StatefulIterator(Protocol):
  def __next__(self) -> LocalBatch: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


@dataclasses.dataclass(frozen=True)
class Task:
  """What the loop needs from a task (MLM, classification, NER, QA).

  Attributes:
    model: the Flax module.
    init_inputs: example positional inputs for `model.init` (any batch size).
    loss_fn: see `jaxfm.train.step`.
    summarize: turns summed eval `Sums` into reported metrics.
    flops_per_token: sequence length -> training FLOPs per input token (`jaxfm.train.flops`).
    batch_spec: per-example (shape, dtype) of each batch field at the full sequence length,
      for ahead-of-time compiles.
    predict_fn: `(params, batch) -> outputs` per example, including the batch's
      `feature_index` [b] (-1 marks padding); None when `summarize` is all there is.
    score: metrics from all eval outputs, in feature order (see `gather_outputs`).
  """

  model: nn.Module
  init_inputs: tuple[np.ndarray, ...]
  loss_fn: LossFn
  summarize: Callable[[dict[str, float]], dict[str, float]]
  flops_per_token: Callable[[int], float]
  batch_spec: dict[str, tuple[tuple[int, ...], str]]
  predict_fn: Callable[[Any, Any], dict[str, jax.Array]] | None = None
  score: Callable[[dict[str, np.ndarray]], dict[str, float]] | None = None

  def init_params(self, rng: jax.Array) -> Any:
    return self.model.init(rng, *self.init_inputs)["params"]


class _StopSignal:
  """Turns SIGTERM into a request to save at the next step boundary and exit cleanly.

  With several processes, JAX's own preemption notifier (started by
  `jax.distributed.initialize`) catches SIGTERM and `reached_preemption_sync_point`
  makes every host stop at the same step; a Python handler would hide the signal
  from it and let hosts disagree, so none is installed then.
  """

  def __init__(self):
    self.requested = False

  @contextlib.contextmanager
  def installed(self) -> Iterator[None]:
    if jax.process_count() > 1:
      yield
      return
    previous = signal.signal(signal.SIGTERM, self._handle)
    try:
      yield
    finally:
      signal.signal(signal.SIGTERM, previous)

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving at the next step boundary, then exiting")
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.requested


def make_mesh(cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The config's (data, fsdp, tensor) mesh over `devices` (default: all)."""
  return sharding.make_mesh((cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor), devices)


@dataclasses.dataclass(frozen=True)
class Steps:
  """The jitted pure functions of a run and the shardings they were built with.

  `train_step(state, batch) -> (state, metrics)` donates the state;
  `eval_step(params, batch) -> (sums, outputs)` with the task's per-example predict
  outputs ({} without a `predict_fn`), replicated. Neither is compiled yet: `.lower(...)`
  them with real or abstract (`abstract_state`, `abstract_batch`) arguments.
  """

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[jax.Array], TrainState]  # seed key -> unboxed state (not jitted)
  state_shardings: TrainState
  abstract_state: TrainState
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any
  eval_step: Any

  def abstract_batch(self, task: Task, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `batch_size` examples as ShapeDtypeStructs with the batch sharding."""
    return {k: jax.ShapeDtypeStruct((batch_size, *shape), np.dtype(dtype),
                                    sharding=self.batch_sharding)
            for k, (shape, dtype) in task.batch_spec.items()}


def build_steps(cfg: ml_collections.ConfigDict, task: Task, mesh: jax.sharding.Mesh) -> Steps:
  """Optimiser, state shardings and jitted train/eval steps for `task` on `mesh`."""
  t = cfg.train
  schedule = optim.learning_rate_schedule(cfg.optim, t.steps)
  tx = optim.make_optimizer(cfg.optim, t.steps)

  def init_state(rng: jax.Array) -> TrainState:
    return create_train_state(task.init_params(rng), tx, t.seed)

  boxed = jax.eval_shape(init_state, jax.random.key(t.seed))
  state_shardings = sharding.unbox(sharding.logical_shardings(boxed, mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh)
  train_step = jax.jit(
      make_train_step(task.loss_fn, tx, schedule, t.grad_accum_steps, t.skip_nonfinite),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  eval_step = jax.jit(make_eval_step(task.loss_fn, task.predict_fn),
                      in_shardings=(state_shardings.params, batch_sharding),
                      out_shardings=replicated)
  return Steps(tx=tx, schedule=schedule, init_state=lambda r: sharding.unbox(init_state(r)),
               state_shardings=state_shardings,
               abstract_state=checkpoint.abstract_like(sharding.unbox(boxed), state_shardings),
               batch_sharding=batch_sharding, train_step=train_step, eval_step=eval_step)


def compile_train_step(steps: Steps, batch: dict[str, Any],
                       mesh: jax.sharding.Mesh) -> tuple[Any, float]:
  """AOT-compiles `steps.train_step` for the abstract state and `batch`'s shapes and shardings
  (arrays or `steps.abstract_batch(...)`): (executable, seconds).

  The heap the compiler freed is handed back to the OS (`jaxfm.cpu.process`); `train` compiles the
  first batch's step before any state exists, so the compiler's peak is not added to the
  state's (bert-mini fine-tuning step with remat=full, `python -m benchmarks.step`: peak RSS
  866 -> 820 MiB).
  """
  start = time.perf_counter()
  with sharding.activation_sharding(mesh):
    compiled = steps.train_step.lower(steps.abstract_state, batch).compile()
  seconds = time.perf_counter() - start
  cpu_process.release_free_heap()
  return compiled, seconds


class _TrainExecutables:
  """The compiled train step per global batch shape, each compiled when first asked for
  (fine-tuning's `data.length_buckets` gives batches of several lengths)."""

  def __init__(self, steps: Steps, mesh: jax.sharding.Mesh):
    self._steps, self._mesh = steps, mesh
    self.compiled: dict[tuple[int, ...], Any] = {}  # input_ids shape -> executable
    self.compile_s = 0.0  # all compiles so far

  def for_batch(self, batch: dict[str, Any]) -> Any:
    """The executable for `batch` (arrays or ShapeDtypeStructs), compiling it if new."""
    shape = tuple(batch["input_ids"].shape)
    if shape not in self.compiled:
      self.compiled[shape], seconds = compile_train_step(self._steps, batch, self._mesh)
      self.compile_s += seconds
      if len(self.compiled) > 1:
        logging.info("compiled the train step for batches of shape %s in %.1f s", shape, seconds)
    return self.compiled[shape]


def gather_outputs(outputs: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  """Per-batch predict outputs -> numpy arrays of the real rows, sorted by `feature_index`.

  Per-position outputs of batches cut to different lengths (`data.length_buckets`) are
  padded with zeros on axis 1 to the longest: those positions were padding.
  """
  host = jax.device_get(outputs)
  merged = {k: np.concatenate(_padded_on_axis_1([o[k] for o in host])) for k in host[0]}
  keep = np.flatnonzero(merged["feature_index"] >= 0)
  keep = keep[np.argsort(merged["feature_index"][keep], kind="stable")]
  return {k: v[keep] for k, v in merged.items()}


def _eval_pass(steps: Steps, params: Any, local_batches: Iterable[LocalBatch],
               mesh: jax.sharding.Mesh) -> list[tuple[Sums, dict[str, jax.Array]]]:
  """`eval_step` (sums, outputs) over one pass of this host's batches."""
  return [steps.eval_step(params, sharding.global_batch(local, mesh)) for local in local_batches]


def predict(steps: Steps, params: Any, local_batches: Iterable[LocalBatch],
            mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """All predict outputs of one pass over this host's batches (see `gather_outputs`)."""
  return gather_outputs([outputs for _, outputs in _eval_pass(steps, params, local_batches, mesh)])


def evaluate(task: Task, steps: Steps, params: Any, local_batches: Iterable[LocalBatch],
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss summary (and the task's scores) over one pass of this host's eval batches."""
  results = _eval_pass(steps, params, local_batches, mesh)
  if not results:
    return {}
  metrics = task.summarize(_summed([sums for sums, _ in results]))
  if task.score is not None:
    metrics.update(task.score(gather_outputs([outputs for _, outputs in results])))
  return metrics


def _padded_on_axis_1(arrays: list[np.ndarray]) -> list[np.ndarray]:
  """`arrays` with zeros appended on axis 1 to the widest (unchanged if all are as wide)."""
  if arrays[0].ndim < 2:
    return arrays
  width = max(a.shape[1] for a in arrays)
  return [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]


def _summed(metrics: list[Sums]) -> dict[str, float]:
  host = jax.device_get(metrics)
  return {k: float(np.sum([m[k] for m in host])) for k in host[0]}


@dataclasses.dataclass
class TrainResult:
  step: int
  train: dict[str, float]
  eval: dict[str, float]
  preempted: bool
  stopped_early: bool = False


def train(cfg: ml_collections.ConfigDict, workdir: str, task: Task, train_iter: StatefulIterator,
          eval_batches: Callable[[], Iterable[LocalBatch]], meta: dict[str, Any],
          initial_params: Any | None = None,
          best: BestCheckpoint | None = None) -> TrainResult:
  """Restores or initialises, trains to `cfg.train.steps`, evaluates and checkpoints.

  Args:
    cfg: a validated experiment config.
    workdir: checkpoints, TensorBoard events and metrics.jsonl go here.
    task: model, loss and metric summary.
    train_iter: this host's batches (per-host batch size), with loader state.
    eval_batches: returns a fresh pass over this host's eval batches.
    meta: JSON-able run metadata stored with every checkpoint (config, counters...).
    initial_params: weights to start from instead of a random init (fine-tuning);
      ignored when the workdir already holds a checkpoint.
    best: keeps the best evaluation's params and stops early (fine-tuning).
  """
  t = cfg.train
  mesh = make_mesh(cfg)
  steps = build_steps(cfg, task, mesh)
  tx, schedule, state_shardings = steps.tx, steps.schedule, steps.state_shardings

  def complete(step: int) -> bool:
    return step >= t.steps or (best is not None and best.should_stop(step))

  manager = checkpoint.make_manager(workdir, t.keep_checkpoints, t.keep_every,
                                    t.async_checkpointing)
  latest = manager.latest_step()
  executables = _TrainExecutables(steps, mesh)
  batch = None  # the next global batch to train on, once fetched
  resuming = latest is not None and not complete(latest)
  data_state = checkpoint.read_data_state(manager, latest) if resuming else None
  if latest is None or data_state is not None:
    # The first batch's step is compiled before any state exists (a lower peak), for the
    # shape that batch has (fine-tuning's length buckets cut it), not for one it may not need.
    if data_state is not None:
      train_iter.set_state(data_state)
    batch = sharding.global_batch(next(train_iter), mesh)
    executables.for_batch(batch)
  restored = checkpoint.restore_latest(manager, steps.abstract_state)
  if restored is not None:
    state = restored.state
    if batch is None or restored.step != latest:  # the newest step did not restore
      train_iter.set_state(restored.data)
      batch = None
    logging.info("resumed from step %d of %s", restored.step, manager.directory)
  elif initial_params is not None:
    params = jax.device_put(initial_params, state_shardings.params)
    state = jax.jit(lambda p: create_train_state(p, tx, t.seed),
                    out_shardings=state_shardings)(params)
  else:
    state = jax.jit(steps.init_state, out_shardings=state_shardings)(jax.random.key(t.seed))
  cpu_process.release_free_heap()  # what restoring or initialising (and its compiler) freed
  start = int(jax.device_get(state.step))
  if complete(start):  # a relaunch of a finished run: nothing to compile or train
    logging.info("step %d: training is already complete in %s", start, workdir)
    manager.close()
    return TrainResult(step=start, train={}, eval={}, preempted=False)

  writer = MetricWriter(workdir, t.wandb_project, cfg.to_dict())
  stop = _StopSignal()
  peak = peak_flops_per_device(jax.devices()[0].device_kind)

  def run_eval(params: Any) -> dict[str, float]:
    return evaluate(task, steps, params, eval_batches(), mesh)

  def save(step: int, force: bool = False) -> None:
    if not t.skip_nonfinite and int(jax.device_get(state.consecutive_nonfinite)):
      logging.warning("step %d: not checkpointing non-finite params (train.skip_nonfinite=False)",
                      step)
      return
    checkpoint.save(manager, step, state, train_iter.get_state(), meta, force=force)

  train_metrics: dict[str, float] = {}
  eval_metrics: dict[str, float] = {}
  preempted = stopped_early = False
  with checkpoint.finishing(manager), sharding.activation_sharding(mesh), stop.installed(), \
      tqdm.tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
                disable=not (t.progress_bar and jax.process_index() == 0)) as bar:
    log_line(start, {"compile_s": executables.compile_s}, "compile")
    if start == 0 and t.eval_batches:
      eval_metrics = run_eval(state.params)
      writer.write(0, eval_metrics, "eval")
      log_line(0, eval_metrics, "eval")
      cpu_process.release_free_heap()  # what the eval step's compiler freed
    pending: list[Sums] = []
    interval_start = time.perf_counter()
    interval_steps, interval_tokens, interval_flops = 0, 0, 0.0
    last_save_time = time.monotonic()
    for step in range(start, t.steps):
      if batch is None:
        batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = executables.for_batch(batch)(state, batch)
      length = batch["input_ids"].shape[1]
      interval_tokens += batch["input_ids"].size
      interval_flops += batch["input_ids"].size * task.flops_per_token(length)
      batch = None
      pending.append(metrics)
      interval_steps += 1
      done = step + 1
      bar.update(1)
      if done % t.log_every == 0 or done == t.steps:
        sums = _summed(pending)
        elapsed = time.perf_counter() - interval_start
        tokens_per_s = interval_tokens / elapsed
        train_metrics = {
            **task.summarize(sums),
            "grad_norm": sums["grad_norm"] / interval_steps,
            "learning_rate": float(jax.device_get(schedule(step))),
            "nonfinite_steps": interval_steps - sums["finite"],
            "skipped_steps_total": float(jax.device_get(state.skipped_steps)),
            "tokens_per_s": tokens_per_s,
            "compile_s": executables.compile_s,
        }
        if peak:
          train_metrics["mfu"] = interval_flops / elapsed / (peak * jax.device_count())
        writer.write(done, train_metrics, "train")
        bar.set_postfix(loss=f"{train_metrics['loss']:.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if not bar.disable and done % (t.log_every * 10) == 0:
          log_line(done, train_metrics, "train")
        streak = int(jax.device_get(state.consecutive_nonfinite))
        if streak >= t.max_consecutive_nonfinite:
          manager.wait_until_finished()
          raise NonFiniteError(
              f"{streak} consecutive steps up to step {done} had non-finite loss or gradients "
              f"(train.skip_nonfinite={t.skip_nonfinite}); stopping. The last good checkpoint "
              f"is step {manager.latest_step()} in {manager.directory}.")
        pending, interval_start, interval_steps, interval_tokens, interval_flops = (
            [], time.perf_counter(), 0, 0, 0.0)
        if t.checkpoint_every_seconds and done < t.steps:
          overdue = time.monotonic() - last_save_time >= t.checkpoint_every_seconds
          if multihost_utils.broadcast_one_to_all(np.asarray(overdue)):
            save(done, force=True)
            last_save_time = time.monotonic()
      evaluated = t.eval_batches and (done % t.eval_every == 0 or done == t.steps)
      if evaluated:
        eval_metrics = run_eval(state.params)
        writer.write(done, eval_metrics, "eval")
        log_line(done, eval_metrics, "eval")
        if best is not None:
          best.update(done, state.params, eval_metrics)
      stopped_early = bool(evaluated) and best is not None and best.should_stop(done)
      if stopped_early:
        logging.info("early stopping at step %d: no better %s than step %d for %d evaluations",
                     done, best.metric, best.best_step(), best.patience)
        if manager.latest_step() != done:
          save(done, force=True)
        break
      if done % t.checkpoint_every == 0 or done == t.steps:
        save(done)
        last_save_time = time.monotonic()
      if stop.should_stop(done):
        if manager.latest_step() != done:
          save(done, force=True)
        preempted = True
        break
  writer.close()
  if train_metrics:
    log_line(int(jax.device_get(state.step)), train_metrics, "train")
  return TrainResult(step=int(jax.device_get(state.step)), train=train_metrics,
                     eval=eval_metrics, preempted=preempted, stopped_early=stopped_early)
