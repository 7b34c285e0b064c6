"""The one training loop: pretraining and every fine-tuning task run through `train`.

The periodic work around the step (reports, evaluation, checkpoints, early and preempted
stops) lives in `jaxfm.train.actions`; one pass of the eval step in `jaxfm.train.evaluation`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from absl import logging

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm import workdir as workdir_lib
from jaxfm.cpu import process as cpu_process
from jaxfm.train import actions, checkpoint, optim
from jaxfm.train.actions import NonFiniteError
from jaxfm.train.best import BestCheckpoint
from jaxfm.train.evaluation import LocalBatch, evaluate, gather_outputs, predict
from jaxfm.train.state import TrainState, create_train_state
from jaxfm.train.step import LossFn, make_eval_step, make_train_step
from jaxfm.train.writer import MetricWriter, log_line

__all__ = ["NonFiniteError", "StatefulIterator", "Steps", "Task", "TrainResult", "build_steps",
           "compile_eval_step", "compile_train_step", "evaluate", "gather_outputs", "make_mesh",
           "predict", "train"]


class StatefulIterator(Protocol):
  def __next__(self) -> LocalBatch: ...
  def get_state(self) -> Any: ...
  def set_state(self, state: Any) -> None: ...


class FrozenSplit(Protocol):
  """Params split into a trainable tree and a frozen one the steps take as an argument, never
  as a constant: `jaxfm.peft.Plan` (adapter + new head over the base), distillation's parts
  (the student over the teacher). `penalty` is None or a function of the trainable tree added
  to the training loss per weighted target; `optimizer(tx, total_steps)` is the run's
  optimiser, or it wrapped with the split's own state (`jaxfm.peft.Plan`: AdaLoRA)."""

  penalty: Callable[[Any], jax.Array] | None

  def trainable(self, params: Any, rng: jax.Array) -> Any: ...
  def frozen(self, params: Any) -> Any: ...
  def combine(self, trainable: Any, frozen: Any) -> Any: ...
  def optimizer(self, tx: optax.GradientTransformationExtraArgs, total_steps: int
                ) -> optax.GradientTransformationExtraArgs: ...


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

  With a `FrozenSplit` plan the state's params are the trainable tree and `train_step` takes a
  third argument, the frozen tree (`frozen_args()`): abstract until `with_frozen` places the
  real one, which `eval_step` then carries.
  """

  tx: optax.GradientTransformation
  schedule: optax.Schedule
  init_state: Callable[[jax.Array], TrainState]  # seed key -> unboxed state (not jitted)
  state_shardings: TrainState
  abstract_state: TrainState
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any
  eval_step: Any
  frozen_shardings: Any = None  # PEFT: of the frozen base params
  frozen: Any = None  # PEFT: the frozen base on the mesh (ShapeDtypeStructs until with_frozen)

  def frozen_args(self) -> tuple[Any, ...]:
    """The train step's arguments after (state, batch)."""
    return () if self.frozen is None else (self.frozen,)

  def with_frozen(self, frozen: Any) -> Steps:
    """These steps with the frozen base `frozen` (host arrays) placed on their shardings."""
    placed = jax.device_put(frozen, self.frozen_shardings)
    return dataclasses.replace(self, frozen=placed,
                               eval_step=functools.partial(_with_base, self.eval_step, placed))

  def abstract_batch(self, task: Task, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `batch_size` examples as ShapeDtypeStructs with the batch sharding."""
    return {k: jax.ShapeDtypeStruct((batch_size, *shape), np.dtype(dtype),
                                    sharding=self.batch_sharding)
            for k, (shape, dtype) in task.batch_spec.items()}


def _with_base(eval_step: Any, frozen: Any, params: Any, batch: Any) -> Any:
  """`eval_step` with the frozen base bound (what `evaluation` calls as (params, batch))."""
  return eval_step(params, batch, frozen)


def build_steps(cfg: ml_collections.ConfigDict, task: Task, mesh: jax.sharding.Mesh,
                plan: FrozenSplit | None = None) -> Steps:
  """Optimiser, state shardings and jitted train/eval steps for `task` on `mesh`; with `plan`,
  for its trainable tree over a frozen base (see `Steps`)."""
  t = cfg.train
  schedule = optim.learning_rate_schedule(cfg.optim, t.steps)
  tx = optim.make_optimizer(
      cfg.optim, t.steps, fused=config_lib.use_cpu_paths(cfg, mesh.devices.flat[0].platform))
  if plan is not None:
    tx = plan.optimizer(tx, t.steps)

  def init_params(rng: jax.Array) -> Any:
    params = task.init_params(rng)
    return params if plan is None else plan.trainable(params, rng)

  def init_state(rng: jax.Array) -> TrainState:
    return create_train_state(init_params(rng), tx, t.seed)

  key = jax.random.key(t.seed)
  boxed = jax.eval_shape(init_state, key)
  state_shardings = sharding.unbox(sharding.logical_shardings(boxed, mesh))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = sharding.batch_sharding(mesh)
  combine = frozen_shardings = abstract_frozen = None
  if plan is not None:
    combine = plan.combine
    boxed_frozen = plan.frozen(jax.eval_shape(task.init_params, key))
    frozen_shardings = sharding.unbox(sharding.logical_shardings(boxed_frozen, mesh))
    abstract_frozen = checkpoint.abstract_like(sharding.unbox(boxed_frozen), frozen_shardings)
  # The frozen base is an argument (never an executable's constant), without PEFT none.
  base = () if plan is None else (frozen_shardings,)
  train_step = jax.jit(
      make_train_step(task.loss_fn, tx, schedule, t.grad_accum_steps, t.skip_nonfinite, combine,
                      None if plan is None else plan.penalty),
      in_shardings=(state_shardings, batch_sharding, *base),
      out_shardings=(state_shardings, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(task.loss_fn, task.predict_fn, combine),
                      in_shardings=(state_shardings.params, batch_sharding, *base),
                      out_shardings=replicated)
  return Steps(tx=tx, schedule=schedule, init_state=lambda r: sharding.unbox(init_state(r)),
               state_shardings=state_shardings,
               abstract_state=checkpoint.abstract_like(sharding.unbox(boxed), state_shardings),
               batch_sharding=batch_sharding, train_step=train_step, eval_step=eval_step,
               frozen_shardings=frozen_shardings, frozen=abstract_frozen)


def compile_train_step(steps: Steps, batch: dict[str, Any],
                       mesh: jax.sharding.Mesh) -> tuple[Any, float]:
  """AOT-compiles `steps.train_step` for the abstract state and `batch`'s shapes and shardings
  (arrays or `steps.abstract_batch(...)`): (executable, seconds).

  The heap the compiler freed is handed back to the OS (`jaxfm.cpu.process`); `train` compiles
  the first batch's step before any state exists, so the compiler's peak is not added to the
  state's.
  """
  return _compile(steps.train_step, (steps.abstract_state, batch, *steps.frozen_args()), mesh)


def compile_eval_step(steps: Steps, batch: dict[str, Any],
                      mesh: jax.sharding.Mesh) -> tuple[Any, float]:
  """AOT-compiles `steps.eval_step` (before `with_frozen`) for the abstract params and
  `batch`'s shapes and shardings: (executable, seconds)."""
  return _compile(steps.eval_step, (steps.abstract_state.params, batch, *steps.frozen_args()),
                  mesh)


def _compile(step: Any, args: tuple[Any, ...], mesh: jax.sharding.Mesh) -> tuple[Any, float]:
  start = time.perf_counter()
  with sharding.activation_sharding(mesh):
    compiled = step.lower(*args).compile()
  seconds = time.perf_counter() - start
  cpu_process.release_free_heap()
  return compiled, seconds


class _Executables:
  """One step's executables per global batch shape, called as the step is, `(state or params,
  batch, *frozen)`.

  A shape is compiled when a batch first needs it, or ahead (`compile_ahead`) on background
  threads while the loop trains: fine-tuning's length buckets give batches of several lengths,
  XLA compiles one program on one core, and the step leaves cores idle (most of a TPU host's,
  some of a CPU's), so a bucket's first batch seldom waits for its compile. `compile_s`
  counts the seconds callers waited.
  """

  def __init__(self, name: str, compile_step: Callable[[dict[str, Any]], tuple[Any, float]]):
    self._name, self._compile_step = name, compile_step
    self._compiled: dict[tuple[int, ...], Any] = {}  # input_ids shape -> executable
    self._ahead: dict[tuple[int, ...], concurrent.futures.Future] = {}
    self.compile_s = 0.0

  def __call__(self, *args: Any) -> Any:
    return self.for_batch(args[1])(*args)

  def for_batch(self, batch: dict[str, Any]) -> Any:
    """The executable for `batch` (arrays or ShapeDtypeStructs), compiling it if new."""
    shape = tuple(batch["input_ids"].shape)
    if shape not in self._compiled:
      start = time.perf_counter()
      if shape in self._ahead:
        self._compiled[shape] = self._ahead.pop(shape).result()
      else:
        self._compiled[shape] = self._compile(batch)
      self.compile_s += time.perf_counter() - start
    return self._compiled[shape]

  def compile_ahead(self, batches: Iterable[dict[str, Any]],
                    pool: concurrent.futures.ThreadPoolExecutor) -> None:
    """Queues on `pool` the compiles of `batches`' shapes not compiled or queued yet."""
    for batch in batches:
      shape = tuple(batch["input_ids"].shape)
      if shape not in self._compiled and shape not in self._ahead:
        self._ahead[shape] = pool.submit(self._compile, batch)

  def _compile(self, batch: dict[str, Any]) -> Any:
    compiled, seconds = self._compile_step(batch)
    if self._compiled or self._ahead:
      logging.info("compiled the %s step for batches of shape %s in %.1f s", self._name,
                   tuple(batch["input_ids"].shape), seconds)
    return compiled


def _bucket_batches(batch: dict[str, Any], task: Task,
                    lengths: Sequence[int]) -> list[dict[str, jax.ShapeDtypeStruct]]:
  """`batch` (a global batch, cut to any bucket) as abstract batches cut to each of `lengths`
  (ascending, the last the full length), shortest first: the fields the task's batch has at
  full length on axis 1 take each length."""
  cut = {k for k, (shape, _) in task.batch_spec.items() if shape and shape[0] == lengths[-1]}
  return [{k: jax.ShapeDtypeStruct((v.shape[0], length, *v.shape[2:]) if k in cut else v.shape,
                                   v.dtype, sharding=v.sharding) for k, v in batch.items()}
          for length in lengths]


@contextlib.contextmanager
def _compile_pool() -> Iterator[concurrent.futures.ThreadPoolExecutor]:
  """Threads for compiles ahead, one per core; on exit the compiles not started are dropped
  and those running awaited (a thread cannot be stopped)."""
  pool = concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, "compile_ahead")
  try:
    yield pool
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


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
          best: BestCheckpoint | None = None, plan: FrozenSplit | None = None,
          frozen: Any = None) -> TrainResult:
  """Restores or initialises, trains to `cfg.train.steps`, evaluates and checkpoints.

  Args:
    cfg: a validated experiment config.
    workdir: checkpoints, TensorBoard events and metrics.jsonl go here.
    task: model, loss and metric summary.
    train_iter: this host's batches (per-host batch size), with loader state.
    eval_batches: returns a fresh pass over this host's eval batches.
    meta: JSON-able run metadata stored with every checkpoint (config, counters...).
    initial_params: weights to start from instead of a random init (unused on a resume);
      with `plan`, the trainable tree's (`FrozenSplit.trainable`).
    best: keeps the best evaluation's params and stops early (fine-tuning).
    plan: a `FrozenSplit` (PEFT, distillation): only its trainable tree trains and is saved.
    frozen: with `plan`, the frozen base params (host arrays).
  """
  t = cfg.train
  mesh = make_mesh(cfg)
  steps = build_steps(cfg, task, mesh, plan)
  manager = checkpoint.make_manager(workdir, t.keep_checkpoints, t.keep_every,
                                    t.async_checkpointing)
  # Both compiled against the abstract base; the eval step is called through its executables.
  executables = _Executables("train", functools.partial(compile_train_step, steps, mesh=mesh))
  eval_executables = _Executables("eval", functools.partial(compile_eval_step, steps, mesh=mesh))
  steps = dataclasses.replace(steps, eval_step=eval_executables)
  if plan is not None:
    steps = steps.with_frozen(frozen)
  state, batch = _restore_or_init(cfg, steps, manager, mesh, executables, train_iter,
                                  initial_params, best)
  start = int(jax.device_get(state.step))
  if _complete(t.steps, best, start):  # a relaunch of a finished run: nothing to compile or train
    logging.info("step %d: training is already complete in %s", start, workdir)
    manager.close()
    return TrainResult(step=start, train={}, eval={}, preempted=False)

  writer = MetricWriter(workdir, t.wandb_project, cfg.to_dict(), start_step=start)
  evaluation = actions.Evaluation(
      lambda params: evaluate(task, steps, params, eval_batches(), mesh), writer, t.eval_every,
      t.steps)
  stop = actions.StopSignal()
  profile = actions.Profile(str(workdir_lib.tensorboard_dir(workdir)),
                            config_lib.profile_window(t))
  ended_by = None  # the action that ended the run before `t.steps`, if one did
  spent: collections.Counter[str] = collections.Counter()  # seconds in each kind of action
  loop_start = time.perf_counter()
  # The pool closes last: a preempted run's checkpoint commits before running compiles end.
  with _compile_pool() as pool, checkpoint.finishing(manager), sharding.activation_sharding(mesh), \
      stop.installed(), profile.closing(), _progress_bar(t, start) as bar:
    log_line(start, {"compile_s": executables.compile_s}, "compile")
    if batch is None:
      batch = sharding.global_batch(next(train_iter), mesh)
    lengths = config_lib.length_buckets(cfg.data)
    executables.compile_ahead(_bucket_batches(batch, task, lengths), pool)
    if t.eval_batches:
      first_eval = next(iter(eval_batches()), None)
      if first_eval is not None:
        eval_executables.compile_ahead(
            _bucket_batches(sharding.global_batch(first_eval, mesh), task, lengths), pool)
    if start == 0 and t.eval_batches and t.eval_at_start:
      with actions.timed(spent, evaluation):
        evaluation.run(0, state.params)
      cpu_process.release_free_heap()  # what the eval step's compiler freed
    progress = actions.ReportProgress(task.summarize, task.flops_per_token, steps.schedule,
                                      lambda: executables.compile_s, writer, bar, t.log_every,
                                      t.steps, getattr(train_iter, "examples_seen", dict))
    after_step = [profile, progress,
                  *_after_report(cfg, manager, train_iter, meta, evaluation, best, stop)]
    for step in range(start, t.steps):
      if batch is None:
        batch = sharding.global_batch(next(train_iter), mesh)
      state, metrics = executables(state, batch, *steps.frozen_args())
      info = actions.StepInfo(step + 1, state, metrics, tuple(batch["input_ids"].shape))
      batch = None
      ended_by = actions.run_after_step(after_step, info, spent)
      if ended_by is not None:
        break
  writer.close()
  actions.log_time_spent(time.perf_counter() - loop_start, spent)
  if progress.metrics:
    log_line(int(jax.device_get(state.step)), progress.metrics, "train")
  return TrainResult(step=int(jax.device_get(state.step)), train=progress.metrics,
                     eval=evaluation.metrics, preempted=isinstance(ended_by, actions.Preemption),
                     stopped_early=isinstance(ended_by, actions.KeepBest))


def _progress_bar(t: ml_collections.ConfigDict, start: int) -> tqdm.tqdm:
  """Steps done of `t.steps`, on process 0 when `t.progress_bar` asks for it."""
  return tqdm.tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True,
                   disable=not (t.progress_bar and jax.process_index() == 0))


def _complete(total_steps: int, best: BestCheckpoint | None, step: int) -> bool:
  """Whether a run at `step` has nothing left to train."""
  return step >= total_steps or (best is not None and best.should_stop(step))


def _restore_or_init(cfg: ml_collections.ConfigDict, steps: Steps, manager: ocp.CheckpointManager,
                     mesh: jax.sharding.Mesh, executables: _Executables,
                     train_iter: StatefulIterator, initial_params: Any | None,
                     best: BestCheckpoint | None) -> tuple[TrainState, dict[str, jax.Array] | None]:
  """The state to train from (the newest checkpoint, `initial_params` or a random init) and the
  first global batch when it was fetched already, its step compiled."""
  t = cfg.train
  latest = manager.latest_step()
  batch = None
  resuming = latest is not None and not _complete(t.steps, best, latest)
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
    params = jax.device_put(initial_params, steps.state_shardings.params)
    state = jax.jit(lambda p: create_train_state(p, steps.tx, t.seed),
                    out_shardings=steps.state_shardings)(params)
  else:
    state = jax.jit(steps.init_state, out_shardings=steps.state_shardings)(jax.random.key(t.seed))
  cpu_process.release_free_heap()  # what restoring or initialising (and its compiler) freed
  return state, batch


def _after_report(cfg: ml_collections.ConfigDict, manager: ocp.CheckpointManager,
                  train_iter: StatefulIterator, meta: dict[str, Any],
                  evaluation: actions.Evaluation, best: BestCheckpoint | None,
                  stop: actions.StopSignal) -> list[actions.Action]:
  """The actions after the train metrics' report, in the order they run within a step."""
  t = cfg.train
  saver = actions.Checkpointer(manager, train_iter.get_state, meta, t.skip_nonfinite)
  every_step: list[actions.Action | None] = [
      actions.NonFiniteGuard(manager, t.max_consecutive_nonfinite, t.skip_nonfinite,
                             t.log_every, t.steps),
      (actions.TimedCheckpoint(saver, t.checkpoint_every_seconds, t.log_every, t.steps)
       if t.checkpoint_every_seconds else None),
      evaluation if t.eval_batches else None,
      actions.KeepBest(best, evaluation, saver) if best is not None else None,
      actions.PeriodicCheckpoint(saver, t.checkpoint_every, t.steps),
      actions.Preemption(stop, saver),
  ]
  return [action for action in every_step if action is not None]
