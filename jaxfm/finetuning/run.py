"""Fine-tuning runs: `finetune` (train in a workdir), then `evaluate` and `predict`, which
need only that workdir (its resolved config, label vocabulary, tokenizer and checkpoints)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from jaxfm import config as config_lib
from jaxfm import compress, peft, sharding
from jaxfm.data import length_groups, loader
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm import runtime, weights
from jaxfm import workdir as workdir_lib
from jaxfm.tasks import (TASKS, Features, TaskSplit, load_split, load_unlabelled, make_task,
                         validate_finetune)
from jaxfm.models import unstack_layers
from jaxfm.train import best, checkpoint, loop
from jaxfm.trees import flatten, unflatten

# Errors the entry points turn into one `error: ...` line and exit code 1.
USER_ERRORS = (config_lib.ConfigError, workdir_lib.WorkdirError, checkpoint.CheckpointError,
               loop.NonFiniteError, best.BestMetricError, ValueError, FileNotFoundError)


def split_path(data: ml_collections.ConfigDict, split: str) -> str:
  """The file (or tfds split name) of 'train', 'dev' or 'test'; '' when not configured."""
  return data[f"{split}_split"] if data.tfds_name else data[f"{split}_file"]


def resolve_schedule(cfg: ml_collections.ConfigDict, num_train: int,
                      dev: TaskSplit | None) -> None:
  """Fills steps, eval/checkpoint intervals, eval batches and warmup from the data."""
  t = cfg.train
  per_epoch = math.ceil(num_train / t.batch_size)
  with cfg.unlocked():
    if t.epochs > 0:
      t.steps = max(1, math.ceil(t.epochs * per_epoch))
    t.eval_every = t.eval_every or per_epoch
    t.checkpoint_every = t.checkpoint_every or t.eval_every
    t.eval_batches = 0 if dev is None else dev.num_eval_batches(
        runtime.per_host_batch_size(cfg), jax.process_count())
    if cfg.optim.warmup_ratio > 0:
      cfg.optim.warmup_steps = round(cfg.optim.warmup_ratio * t.steps)


def resolve_length_buckets(cfg: ml_collections.ConfigDict, train: TaskSplit,
                           platform: str) -> None:
  """Replaces `data.length_buckets=auto` by the lengths `length_groups.choose_buckets` picks for
  the training set's batches in a run of `train.steps` on `platform` devices (config.json
  records them: a resume, evaluate and predict use the same), and logs the lengths and the
  padding share they give."""
  data, batch_size = cfg.data, cfg.train.batch_size
  lengths = train.row_lengths()  # [rows]: one per feature, or packed rows (data.packing)
  if data.length_buckets == "auto":
    cost = length_groups.compile_cost_tokens(data.get("compile_cost_tokens", "auto"), platform)
    chosen = length_groups.auto_buckets(lengths, batch_size, data.seed, data.group_by_length,
                                        data.max_seq_length, data.max_buckets,
                                        data.bucket_multiple, cfg.train.steps, cost)
    logging.info("length buckets chosen for %d steps, a compile counted as %.3g tokens",
                 cfg.train.steps, cost)
    with cfg.unlocked():
      data.length_buckets = ",".join(map(str, chosen))
  buckets = config_lib.length_buckets(data)
  share = length_groups.padding_share(lengths, batch_size, data.seed, buckets,
                                      data.group_by_length)
  with cfg.unlocked():
    data.padding_share = round(share, 4)  # config.json records it with the run
  logging.info("length buckets %s%s: %.3f tokens computed per real token in epoch 0's batches",
               buckets, " (batches grouped by length)" if data.group_by_length else "", share)


def _read_init_from(cfg: ml_collections.ConfigDict) -> tuple[Any, str | None]:
  """The `init_from` params and tokenizer folder (None, None without one); its architecture
  replaces the config's."""
  if not cfg.init_from:
    return None, None
  source = weights.read_pretrained(cfg.init_from, "auto")
  config_lib.take_architecture(cfg, source.config)
  return source.params, source.tokenizer_dir


def _tokenizer(cfg: ml_collections.ConfigDict, tokenizer_dir: str | None) -> Any:
  tokenizer_path = cfg.data.tokenizer or tokenizer_dir
  if not tokenizer_path:
    raise config_lib.ConfigError("data.tokenizer is required when init_from has no tokenizer")
  tokenizer = load_tokenizer(tokenizer_path, lowercase=cfg.data.lowercase)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f"the tokenizer at {tokenizer_path} has {tokenizer.vocab_size} tokens, more than "
        f"model.vocab_size={cfg.model.vocab_size}")
  return tokenizer


def _read_splits(cfg: ml_collections.ConfigDict, tokenizer: Any
                 ) -> tuple[TaskSplit, TaskSplit | None, list[str] | None]:
  """The train split, the dev split (None without one) and the label names."""
  kind, data = cfg.task, cfg.data
  train, label_names = load_split(kind, data, split_path(data, "train"), tokenizer.backend,
                                  None, data.max_train_examples)
  dev = None
  if split_path(data, "dev"):
    dev, _ = load_split(kind, data, split_path(data, "dev"), tokenizer.backend, label_names,
                        data.max_eval_examples)
  logging.info("%s: %d train features, %d dev features, labels %s", kind, len(train),
               len(dev) if dev else 0, label_names)
  return train, dev, label_names


def finetune(cfg: ml_collections.ConfigDict, workdir: str,
             allow_config_change: bool = False) -> tuple[loop.TrainResult, int | None]:
  """Reads the data, resolves the config, starts from `init_from` and runs the shared loop.

  Each part of the config is checked once, as soon as it is final: the task's fields first,
  the model and mesh once `init_from` gave the architecture (then the topology), the
  schedule once the data gave its size. Returns the loop's result and the step of the best
  checkpoint (None without a dev set).
  """
  validate_finetune(cfg)
  pretrained, tokenizer_dir = _read_init_from(cfg)
  config_lib.validate_model(cfg)
  config_lib.validate_mesh(cfg)
  runtime.preflight(cfg)
  tokenizer = _tokenizer(cfg, tokenizer_dir)
  train, dev, label_names = _read_splits(cfg, tokenizer)
  resolve_schedule(cfg, len(train), dev)
  resolve_length_buckets(cfg, train, jax.devices()[0].platform)
  config_lib.validate_optim(cfg)
  config_lib.validate_train(cfg)
  kind, data = cfg.task, cfg.data
  model_config = config_lib.bert_config(cfg, jax.devices()[0].platform)
  task = make_task(kind, model_config, label_names, dev, data)
  initial = plan = frozen = None
  if pretrained is not None:  # new heads keep the loop's own initialisation (same seed)
    fresh = jax.device_get(sharding.unbox(
        jax.jit(task.init_params)(jax.random.key(cfg.train.seed))))
    merged = weights.merge_pretrained(fresh, weights.in_layout(pretrained, model_config),
                                      cfg.init_from)
    initial = merged.params
    if cfg.peft.method:
      plan = peft.Plan(peft.Settings.of(cfg.peft),
                       frozenset(flatten(initial)) - set(merged.initialised), tokenizer)
      frozen = plan.frozen(initial)
      initial = jax.device_get(plan.trainable(initial, jax.random.key(cfg.train.seed)))
      _record_base(cfg, frozen)
      if cfg.peft.init_adapter:
        initial = _continue_adapter(cfg, initial, label_names)
      _log_trainable(initial, frozen)
  workdir_lib.prepare_workdir(workdir, cfg, allow_config_change)
  workdir_lib.write_resolved_config(workdir, cfg)
  workdir_lib.save_run_files(workdir, kind, label_names, tokenizer)
  keeper = None
  if dev is not None:
    keeper = best.BestCheckpoint(workdir, cfg.train.best_metric or TASKS[kind].main_metric,
                                 cfg.train.best_mode, cfg.train.early_stopping_patience,
                                 cfg.train.eval_every)
  train_iter, eval_batches = train_iterator(cfg, train), dev_batches(cfg, dev)
  meta = {"config": cfg.to_dict(), "task": kind, "label_names": label_names}
  task = quantization_aware(cfg, task)  # after the float model initialised the new heads
  try:
    result = loop.train(cfg, workdir, task, train_iter, eval_batches, meta,
                        initial_params=initial, best=keeper, plan=plan, frozen=frozen)
  finally:
    if keeper is not None:
      keeper.close()
  return result, keeper.best_step() if keeper is not None else None


def quantization_aware(cfg: ml_collections.ConfigDict, task: loop.Task) -> loop.Task:
  """`task` as the run trains and scores it: computing as its int8 export does under
  `quantize.qat` (`compress.qat_task`); else (and in configs saved before the option) as is."""
  mode = compress.qat_mode(cfg)
  return compress.qat_task(task, cfg.task, mode) if mode else task


def train_iterator(cfg: ml_collections.ConfigDict, train: TaskSplit) -> loader.TrainIterator:
  """This host's training batches of `train`, shuffled per epoch and cut to the length buckets."""
  data = cfg.data
  return loader.feature_train_iterator(
      train.device_arrays(), loader.HostLayout.of_process(runtime.per_host_batch_size(cfg)),
      seed=data.seed, length_buckets=config_lib.length_buckets(data),
      group_by_length=data.group_by_length)


def dev_batches(cfg: ml_collections.ConfigDict, dev: TaskSplit | None
                ) -> Callable[[], Iterator[Any]]:
  """A fresh pass over this host's share of the dev split at each call (none without one)."""
  if dev is None:
    return lambda: iter(())
  per_host, buckets = runtime.per_host_batch_size(cfg), config_lib.length_buckets(cfg.data)
  return lambda: dev.eval_batches(per_host, jax.process_index(), jax.process_count(), buckets)


def train_cli(flags: runtime.RunFlags,
              train: Callable[[ml_collections.ConfigDict, str, bool],
                              tuple[loop.TrainResult, int | None]] = finetune) -> None:
  """The body of `jaxfm.finetune` (and, with its runner, `jaxfm.distill`): start the process,
  train, print one JSON line (final step, best step, last dev metrics), exit 0 with DONE or
  143 after a SIGTERM save."""
  with runtime.exit_on(USER_ERRORS):
    runtime.initialize_runtime()
    runtime.check_paths(flags.config.value, workdir=flags.workdir.value)
    runtime.use_compilation_cache(flags.workdir.value)
    result, best_step = train(flags.config.value, flags.workdir.value,
                              flags.allow_config_change.value)
  if jax.process_index() == 0:
    print(json.dumps({"step": result.step, "best_step": best_step,
                      "early_stopped": result.stopped_early, "preempted": result.preempted,
                      "dev": result.eval}))
  runtime.finish_training(flags.workdir.value, result.step, result.preempted)


def _record_base(cfg: ml_collections.ConfigDict, frozen: Any) -> None:
  """Puts the frozen base's content hash in `peft.base_sha256` (config.json keeps it), or
  checks it against the one the config already names."""
  digest = peft.base_sha256(unstack_layers(frozen))
  if cfg.peft.base_sha256 and cfg.peft.base_sha256 != digest:
    raise config_lib.ConfigError(
        f"init_from={cfg.init_from}: its params have sha256 {digest}, not "
        f"peft.base_sha256={cfg.peft.base_sha256}")
  with cfg.unlocked():
    cfg.peft.base_sha256 = digest


# The `peft` fields that decide an adapter's shapes and what it computes.
_ADAPTER_FIELDS = ("method", "rank", "alpha", "rslora", "targets", "modules_to_save",
                   "num_virtual_tokens", "prefix_projection", "reduction_factor")


def _continue_adapter(cfg: ml_collections.ConfigDict, fresh: dict[str, Any],
                      label_names: list[str] | None) -> dict[str, Any]:
  """The fresh trainable tree with the adapter of the PEFT workdir `peft.init_adapter` (its best,
  else latest, checkpoint) and its head when the task and labels agree (else the new head).

  Raises:
    ConfigError: that run's adapter differs in a shaping field or was trained on another base.
  """
  source = cfg.peft.init_adapter
  saved_run = workdir_lib.load_run(source)
  if not is_peft_run(saved_run.cfg):
    config_lib.fail("peft.init_adapter", source, "is not a parameter-efficient run")
  ours, theirs = peft.Settings.of(cfg.peft), peft.Settings.of(saved_run.cfg.peft)
  for field in _ADAPTER_FIELDS:
    if getattr(ours, field) != getattr(theirs, field):
      name = "target_modules" if field == "targets" else field
      raise config_lib.ConfigError(
          f"peft.{name}={cfg.peft.get(name)!r} differs from the adapter at "
          f"peft.init_adapter={source} (peft.{name}={saved_run.cfg.peft.get(name, '')!r})")
  if saved_run.cfg.peft.base_sha256 != cfg.peft.base_sha256:
    raise config_lib.ConfigError(
        f"peft.init_adapter={source} was trained on a base with sha256 "
        f"{saved_run.cfg.peft.base_sha256}; init_from={cfg.init_from} has "
        f"{cfg.peft.base_sha256}")
  loaded = weights.workdir_params(source)
  same_head = (saved_run.cfg.task, saved_run.label_names) == (cfg.task, label_names)
  parts = ("adapter", "head") if same_head else ("adapter",)
  started = {part: _same_entries(fresh[part], loaded.params[part], f"{source} {part}")
             for part in parts}
  logging.info("peft.init_adapter %s: the %s from its %s", source, " and ".join(parts),
               loaded.describe())
  return {**fresh, **started}


def _same_entries(fresh: Any, saved: Any, source: str) -> Any:
  """`saved` in `fresh`'s dtypes, checked to hold the same names and shapes."""
  want, have = flatten(fresh), flatten(saved)
  for name, value in want.items():
    if name not in have or np.shape(have[name]) != np.shape(value):
      got = np.shape(have[name]) if name in have else "nothing"
      raise config_lib.ConfigError(
          f"{source}: {name} has {got}, this run needs {np.shape(value)} (model.scan_layers "
          f"and the architecture must match the run that trained it)")
  return unflatten({name: np.asarray(have[name], value.dtype) for name, value in want.items()})


def _size(tree: Any) -> int:
  return sum(np.size(x) for x in jax.tree.leaves(tree))


def _log_trainable(trainable: Any, frozen: Any) -> None:
  adapter, head, base = _size(trainable["adapter"]), _size(trainable["head"]), _size(frozen)
  logging.info("peft: %d trainable params (adapter %d, head %d) over a frozen base of %d "
               "(%.3f%%)", adapter + head, adapter, head, base,
               100.0 * (adapter + head) / (adapter + head + base))


def load_finetuned(field: str, path: str, task: str) -> workdir_lib.SavedRun:
  """The fine-tuning workdir `path` that the config's `field` names, checked to be a `task`
  run.

  Raises:
    ConfigError: naming `field` (an unreadable workdir, another task).
  """
  try:
    run = workdir_lib.load_run(path)
  except (FileNotFoundError, workdir_lib.WorkdirError) as e:
    config_lib.fail(field, path, f"is not a readable fine-tuning workdir: {e}")
  if run.cfg.task != task:
    config_lib.fail(field, path, f"is a task={run.cfg.task!r} run, not task={task!r}")
  return run


def is_peft_run(cfg: ml_collections.ConfigDict) -> bool:
  """Whether a run trained an adapter over a frozen base (configs without a peft section
  predate it: full fine-tuning)."""
  return bool(cfg.get("peft") and cfg.peft.method)


def peft_base(cfg: ml_collections.ConfigDict, task: loop.Task) -> tuple[peft.Plan, Any]:
  """A PEFT run's plan and frozen base, rebuilt from its `init_from` and checked against the
  content hash it was trained with.

  Raises:
    ConfigError: the base at `init_from` is not the one the adapter was trained on.
  """
  source = weights.read_pretrained(cfg.init_from, "auto")
  model_config = config_lib.bert_config(cfg, jax.devices()[0].platform)
  base = weights.provided_params(
      source.params, model_config,
      sharding.unbox(jax.eval_shape(task.init_params, jax.random.key(0))))
  plan = peft.Plan(peft.Settings.of(cfg.peft), frozenset(base))
  frozen = plan.frozen(unflatten(base))
  digest = peft.base_sha256(unstack_layers(frozen))
  if digest != cfg.peft.base_sha256:
    raise config_lib.ConfigError(
        f"init_from={cfg.init_from} changed: its params have sha256 {digest}, the adapter was "
        f"trained on peft.base_sha256={cfg.peft.base_sha256}")
  return plan, frozen


@dataclasses.dataclass(frozen=True)
class Adapted:
  """A PEFT workdir's parts on this host: the plan, its trained tree and the frozen base."""

  run: workdir_lib.SavedRun
  plan: peft.Plan
  trainable: Any
  frozen: Any
  source: str  # which checkpoint the trainable tree came from

  def merged(self) -> Any:
    """The model's params (host arrays): the base with the adapter folded in, or with the
    hooks' params under `encoder/peft` for a method that adds to the model."""
    return jax.device_get(jax.jit(self.plan.combine)(self.trainable, self.frozen))


def adapted(workdir: str) -> Adapted:
  """Reads a PEFT workdir: its best (else latest) trained tree and its checked base."""
  run = workdir_lib.load_run(workdir)
  if not is_peft_run(run.cfg):
    raise ValueError(f"{workdir} is not a parameter-efficient run (its peft.method is unset)")
  task = make_task(run.cfg.task, config_lib.bert_config(run.cfg, "cpu"), run.label_names, None,
                   run.cfg.data)
  plan, frozen = peft_base(run.cfg, task)
  loaded = weights.workdir_params(workdir)
  return Adapted(run, plan, loaded.params, frozen, loaded.describe())


@dataclasses.dataclass(frozen=True)
class Inference:
  """A saved run's model on a mesh with restored params, ready to score or predict `split`."""

  run: workdir_lib.SavedRun
  split: TaskSplit
  task: loop.Task
  steps: loop.Steps
  mesh: jax.sharding.Mesh
  params: Any
  source: str  # which checkpoint the params came from

  def batches(self) -> Iterator[Features]:
    return self.split.eval_batches(runtime.per_host_batch_size(self.run.cfg),
                                   jax.process_index(), jax.process_count(),
                                   config_lib.length_buckets(self.run.cfg.data))


def inference(workdir: str, run: workdir_lib.SavedRun, split: TaskSplit) -> Inference:
  """Builds the run's task model and steps on its mesh and restores the best params (or reads
  an int8 folder's)."""
  task = make_task(run.cfg.task, config_lib.bert_config(run.cfg, jax.devices()[0].platform),
                   run.label_names, split, run.cfg.data)
  mesh = loop.make_mesh(run.cfg)
  if compress.is_int8_dir(workdir):  # a `jaxfm.quantize` folder: int8 params, no checkpoints
    ready = compress.int8_inference(workdir, run.cfg, task, mesh)
    return Inference(run, split, ready.task, ready.steps, mesh, ready.params, ready.source)
  if is_peft_run(run.cfg):
    plan, frozen = peft_base(run.cfg, task)
    steps = loop.build_steps(run.cfg, task, mesh, plan).with_frozen(frozen)
  else:
    task = quantization_aware(run.cfg, task)
    steps = loop.build_steps(run.cfg, task, mesh)
  loaded = weights.workdir_params(workdir, steps.abstract_state)
  return Inference(run, split, task, steps, mesh, loaded.params, loaded.describe())


def evaluate(workdir: str, split: str, input_path: str = "") -> dict[str, float]:
  """Metrics of the workdir's best (else latest) checkpoint on a labelled split."""
  run = workdir_lib.load_run(workdir)
  path = input_path or split_path(run.cfg.data, split)
  if not path:
    raise ValueError(f"no {split} data: the run's config has no data.{split}_file; pass --input")
  task_split, _ = load_split(run.cfg.task, run.cfg.data, path, run.tokenizer.backend,
                             run.label_names)
  job = inference(workdir, run, task_split)
  with sharding.activation_sharding(job.mesh):
    metrics = loop.evaluate(job.task, job.steps, job.params, job.batches(), job.mesh)
  logging.info("scored %s on %d examples (%s)", path, len(task_split.examples), job.source)
  return metrics


def predict(workdir: str, input_path: str) -> list[dict[str, Any]]:
  """One prediction row per input row of a JSONL file (fields per task: see jaxfm.predict)."""
  run = workdir_lib.load_run(workdir)
  split = load_unlabelled(run.cfg.task, run.cfg.data, input_path, run.tokenizer.backend,
                          run.label_names)
  job = inference(workdir, run, split)
  with sharding.activation_sharding(job.mesh):
    outputs = loop.predict(job.steps, job.params, job.batches(), job.mesh)
  logging.info("predicted %d inputs with the %s", len(split.examples), job.source)
  return TASKS[run.cfg.task].predictions(split, outputs, run.label_names, run.cfg.data)


def write_jsonl(rows: Sequence[dict[str, Any]], path: str) -> None:
  """Writes all rows or nothing (a temporary file renamed into place)."""
  out = epath.Path(path)
  tmp = out.parent / (out.name + ".tmp")
  tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
  tmp.replace(out)
