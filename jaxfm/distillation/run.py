"""Distillation runs: a fine-tuned teacher's soft targets (and hidden states) train a smaller
student, through the fine-tuning runner's data, schedule and the shared loop.

The teacher runs in the same jitted step as the student, frozen: its params are the step's
frozen argument (`loop.Steps.frozen_args`, as PEFT's base), sharded on the run's mesh by their
logical axes, in `distill.teacher_dtype`, never an executable's constant. The train state holds
the student and the learned hidden-state projections only, and `best/` the student's params
alone: the workdir is a fine-tuning workdir that evaluate, predict and convert read as any.

With `distill.teacher_cache` the teacher runs once over the training set instead (`cache`),
its top-k logits travel with each training batch, and the step holds no teacher.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxfm import config as config_lib
from jaxfm import compress, runtime, sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.data import loader
from jaxfm.distillation import cache, capture, losses, student
from jaxfm.distillation.teacher import Teacher, load_teacher
from jaxfm.finetuning import run as finetuning
from jaxfm.tasks import TASKS, load_split, make_task, validate_finetune
from jaxfm.train import best, loop
from jaxfm.train.step import Batch, LossFn, Sums

USER_ERRORS = finetuning.USER_ERRORS
Pairs = tuple[tuple[int, int], ...]  # (student, teacher) layers: 0 = embeddings, i = layer i


@dataclasses.dataclass(frozen=True)
class Parts:
  """How `loop.build_steps` splits the distillation model's params (a `loop.FrozenSplit`): the
  teacher is the frozen tree, the student and the projections train."""

  teacher_dtype: str

  def trainable(self, params: dict[str, Any], rng: jax.Array) -> dict[str, Any]:
    del rng
    return {name: tree for name, tree in params.items() if name != "teacher"}

  def frozen(self, params: dict[str, Any]) -> Any:
    """The teacher's part of an abstract (`jax.eval_shape`) tree, in the teacher's dtype."""
    dtype = jnp.dtype(self.teacher_dtype)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), params["teacher"])

  def combine(self, trainable: dict[str, Any], frozen: Any) -> dict[str, Any]:
    return {**trainable, "teacher": frozen}

  penalty = None  # no loss term beyond the distillation loss

  def optimizer(self, tx: optax.GradientTransformationExtraArgs, total_steps: int
                ) -> optax.GradientTransformationExtraArgs:
    del total_steps
    return tx


@dataclasses.dataclass(frozen=True)
class DistillTask(loop.Task):
  """The student's task with the distillation loss; its params are {'student', 'teacher',
  'projection' (when widths differ)} from `init_fn`."""

  init_fn: Callable[[jax.Array], Any] | None = None

  def init_params(self, rng: jax.Array) -> Any:
    return self.init_fn(rng)


def _hidden_sum(found_s: capture.Captured, found_t: capture.Captured, batch: Batch,
                projection: dict[str, Any], pairs: Pairs) -> jax.Array:
  """Sum over the mapped pairs of the hidden-state MSE. The last layer of a classifier runs at
  [CLS] only ([b, 1, d]): a pair holding such a state compares position 0 only."""
  tokens = batch["attention_mask"] * batch["weights"][:, None]  # [b, t]
  total = jnp.zeros((), jnp.float32)
  for s, t in pairs:
    hs, ht = found_s.hidden[s], found_t.hidden[t]  # [b, ls, ds], [b, lt, dt]
    n = min(hs.shape[1], ht.shape[1])
    hs = losses.project(hs[:, :n].astype(jnp.float32), projection.get(f"{s}_{t}"))
    total += losses.hidden_mse(hs, ht[:, :n], tokens[:, :n])
  return total


# Each relation loss: the (A, B) of softmax(A B^T / sqrt(d)) as indices into (q, k, v).
RELATIONS = {"attention": (0, 1), "value_relation": (2, 2), "query_relation": (0, 0),
             "key_relation": (1, 1)}


def _relation_sums(found_s: capture.Captured, found_t: capture.Captured, batch: Batch,
                   settings: LossSettings) -> dict[str, jax.Array]:
  """MiniLM's losses (those of `RELATIONS` weighted), each summed over the mapped (student,
  teacher) layers, per real query token of the batch; over MiniLMv2's relation heads when
  `settings.relation_heads`."""
  names = [name for name in RELATIONS if name in settings.weights]
  keys = batch["attention_mask"]  # [b, t]
  queries = keys * batch["weights"][:, None]  # [b, t]
  totals = {name: jnp.zeros((), jnp.float32) for name in names}
  for s, t in settings.attention_pairs:
    qkv_s = found_s.attention[s].qkv()  # each [b, t, heads, student head_dim]
    qkv_t = tuple(jax.lax.stop_gradient(x) for x in found_t.attention[t].qkv())
    if settings.relation_heads:
      for x in (qkv_s[0], qkv_t[0]):  # a head-pruned layer has a narrower width
        if (x.shape[2] * x.shape[3]) % settings.relation_heads:
          config_lib.fail("distill.relation_heads", settings.relation_heads, f"must divide "
                          f"the attention width {x.shape[2] * x.shape[3]} of layers {s}:{t}")
      qkv_s, qkv_t = ([losses.relation_heads(x, settings.relation_heads) for x in qkv]
                      for qkv in (qkv_s, qkv_t))
    elif qkv_s[0].shape[2] != qkv_t[0].shape[2]:  # e.g. a head-pruned teacher or student
      config_lib.fail("distill.attention_map", f"{s}:{t}", f"pairs a layer of "
                      f"{qkv_s[0].shape[2]} heads with one of {qkv_t[0].shape[2]}: MiniLM "
                      "compares them head by head (or set distill.relation_heads)")
    for name in names:
      a, b = RELATIONS[name]
      totals[name] += losses.relation_kl((qkv_s[a], qkv_s[b]), (qkv_t[a], qkv_t[b]), keys,
                                         queries)
  return totals


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """`distill.losses` as {name: weight} and what they read: the temperature, the hidden-state
  pairs (`distill.layer_map`), the attention pairs (`distill.attention_map`) and the relation
  heads (`distill.relation_heads`)."""

  weights: dict[str, float]
  temperature: float
  regression: bool
  hidden_pairs: Pairs = ()
  attention_pairs: Pairs = ()
  relation_heads: int = 0  # MiniLMv2's (0: the models' own heads)


def distill_loss(student_task: loop.Task, teacher_task: loop.Task,
                 settings: LossSettings) -> LossFn:
  """The weighted sum of `distill.losses` over one batch (see `jaxfm.distillation.losses`).

  The student's task loss runs as fine-tuning's (its sums: loss, accuracy counts), with its
  logits, hidden states and attention inputs read from the same forward (`capture`); the
  teacher runs without dropout, or its top-k logits come with the batch (`cache`; dev batches
  then have none, and no kl). Sums: the task's, `loss_sum` the weighted total, and
  `<name>_sum` per loss (`kl` and `task`, the others when weighted). The per-batch means
  (hidden and the relations) count times the batch's targets, which the step divides by.
  """
  weights = settings.weights

  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    with capture.capturing() as found_s:
      task_sum, sums = student_task.loss_fn(params["student"], batch, rng)
    mask = batch["attention_mask"]
    student_out = losses.head_logits(found_s.output, mask)  # [b, (t or 2,) classes]
    targets = losses.target_weights(found_s.output, batch)
    parts = {"task": task_sum}
    if cache.VALUES in batch:  # a cached teacher's training batch
      parts["kl"] = _cached_soft_targets(student_out, batch, targets, settings)
    elif "teacher" in params:  # else a cached teacher's dev batch: the labels alone
      with capture.capturing() as found_t:
        teacher_task.predict_fn(params["teacher"], batch)
      teacher_out = losses.head_logits(jax.lax.stop_gradient(found_t.output),
                                       mask).astype(jnp.float32)
      parts["kl"] = (
          losses.soft_target_mse(student_out, teacher_out, targets) if settings.regression else
          losses.soft_target_kl(student_out, teacher_out, targets, settings.temperature))
      if "hidden" in weights:
        parts["hidden"] = sums["weight"] * _hidden_sum(
            found_s, found_t, batch, params.get("projection", {}), settings.hidden_pairs)
      for name, value in _relation_sums(found_s, found_t, batch, settings).items():
        parts[name] = sums["weight"] * value
    total = sum(weight * parts[name] for name, weight in weights.items() if name in parts)
    return total, {**sums, "loss_sum": total, **{f"{n}_sum": v for n, v in parts.items()}}
  return loss_fn


def _cached_soft_targets(student_out: jax.Array, batch: Batch, targets: jax.Array,
                         settings: LossSettings) -> jax.Array:
  """The kl loss against `cache.teacher_outputs` in the batch ([b, 1 / t / 2 (QA), k] each)."""
  values, indices = batch[cache.VALUES], batch[cache.INDICES]
  if student_out.ndim == 2:  # a per-example head: the cache's position axis has length 1
    values, indices = values[:, 0], indices[:, 0]
  if settings.regression:  # one output, kept whole
    return losses.soft_target_mse(student_out, values, targets)
  return losses.top_k_kl(student_out, values, indices, targets, settings.temperature)


def summarize_parts(base: Callable[[dict[str, float]], dict[str, float]]
                    ) -> Callable[[dict[str, float]], dict[str, float]]:
  """The task's summary (loss: the weighted total) plus each loss per target (`kl_loss`...)."""
  def summarize(sums: dict[str, float]) -> dict[str, float]:
    weight = max(sums["weight"], 1.0)
    parts = {f"{k[:-4]}_loss": v / weight for k, v in sums.items()
             if k.endswith("_sum") and k != "loss_sum"}
    return {**base(sums), **parts}
  return summarize


def _projections(pairs: Pairs, student_width: int, teacher_width: int
                 ) -> Callable[[jax.Array], dict[str, Any]]:
  """rng -> the learned student -> teacher maps, one per mapped pair ({} for equal widths)."""
  if student_width == teacher_width:
    return lambda rng: {}
  return lambda rng: {f"{s}_{t}": losses.init_projection(jax.random.fold_in(rng, i),
                                                         student_width, teacher_width)
                      for i, (s, t) in enumerate(pairs)}


class StudentBest(best.BestCheckpoint):
  """Keeps the student's params alone in `best/` (what evaluate, predict and convert read)."""

  def update(self, step: int, params: Any, metrics: dict[str, float]) -> None:
    super().update(step, params["student"], metrics)


def _tasks(cfg: ml_collections.ConfigDict, teacher: Teacher, dev: Any, settings: LossSettings
           ) -> tuple[DistillTask, Callable[[jax.Array], dict[str, Any]], loop.Task]:
  """The distillation task, `init_trainable(rng)`: {'student', ('projection')}, and the
  teacher's task. With `distill.teacher_cache` the params hold no teacher."""
  kind, data = cfg.task, cfg.data
  platform = jax.devices()[0].platform
  student_task = make_task(kind, config_lib.bert_config(cfg, platform), teacher.label_names,
                           dev, data)
  teacher_task = make_task(kind, teacher.config.replace(cpu_paths=config_lib.use_cpu_paths(
      cfg, platform)), teacher.label_names, None, data)
  if teacher.int8_mode:  # as it trained and is scored: its int8 model
    teacher_task = compress.int8_task(teacher_task, kind, teacher.int8_mode)
  projections = _projections(settings.hidden_pairs, cfg.model.hidden_size,
                             teacher.config.hidden_size)

  def init_trainable(rng: jax.Array) -> dict[str, Any]:
    projection = projections(jax.random.fold_in(rng, 1))
    return {"student": student_task.init_params(rng),
            **({"projection": projection} if projection else {})}

  fields = {f.name: getattr(student_task, f.name) for f in dataclasses.fields(loop.Task)}
  fields.update(
      summarize=summarize_parts(student_task.summarize),
      predict_fn=lambda params, batch: student_task.predict_fn(params["student"], batch),
      loss_fn=distill_loss(student_task, teacher_task, settings))

  def init_params(rng: jax.Array) -> dict[str, Any]:
    params = init_trainable(rng)
    if cfg.distill.teacher_cache:
      return params
    return {**params, "teacher": teacher_task.init_params(jax.random.fold_in(rng, 2))}
  return DistillTask(**fields, init_fn=init_params), init_trainable, teacher_task


def attention_map(d: ml_collections.ConfigDict, student_layers: int,
                  teacher_layers: int) -> Pairs:
  """`distill.attention_map` as (student, teacher) layers, 1-based: '' = the last of each."""
  if not d.attention_map.strip():
    return ((student_layers, teacher_layers),)
  pairs = []
  for entry in d.attention_map.split(","):
    s, _, t = entry.strip().partition(":")
    if not (s.isdigit() and t.isdigit() and 1 <= int(s) <= student_layers
            and 1 <= int(t) <= teacher_layers):
      config_lib.fail("distill.attention_map", d.attention_map,
                      f"must list S:T layer pairs with 1 <= S <= {student_layers} (student "
                      f"layers) and 1 <= T <= {teacher_layers} (teacher layers)")
    pairs.append((int(s), int(t)))
  return tuple(pairs)


def loss_settings(cfg: ml_collections.ConfigDict, teacher: Teacher) -> LossSettings:
  """The losses of a student of `teacher` (its architecture in `cfg.model`).

  Raises:
    ConfigError: a bad layer map, or relation losses whose heads do not match up.
  """
  d, model = cfg.distill, cfg.model
  weights = config_lib.distill_losses(d)
  hidden = attention = ()
  if "hidden" in weights:
    hidden = config_lib.layer_map(d, model.num_layers, teacher.config.num_layers)
  if set(RELATIONS) & set(weights):
    attention = attention_map(d, model.num_layers, teacher.config.num_layers)
    _check_relation_heads(cfg, teacher)
  return LossSettings(weights, d.temperature, cfg.task == "regression", hidden, attention,
                      d.relation_heads)


def _check_relation_heads(cfg: ml_collections.ConfigDict, teacher: Teacher) -> None:
  """The student's heads are the teacher's (MiniLM), or `distill.relation_heads` splits both
  attention widths (MiniLMv2)."""
  model, heads = cfg.model, cfg.distill.relation_heads
  if not heads:
    if model.num_heads != teacher.config.num_heads:
      config_lib.fail("model.num_heads", model.num_heads, f"must equal the teacher's "
                      f"{teacher.config.num_heads} heads for MiniLM's relation losses, which "
                      "compare them head by head (or set distill.relation_heads)")
    return
  widths = {"student's": model.hidden_size, "teacher's": teacher.config.hidden_size}
  for whose, width in widths.items():
    if width % heads:
      config_lib.fail("distill.relation_heads", heads, f"must divide the {whose} attention "
                      f"width {width}")


def initial_trainable(cfg: ml_collections.ConfigDict, start: Any, init_trainable: Callable) -> Any:
  """The trainable tree to start from: the student's params from `start` (fresh where it
  lacks them) and fresh projections; None for a random student (the loop initialises it)."""
  if start is None:
    return None
  fresh = jax.device_get(sharding.unbox(jax.jit(init_trainable)(jax.random.key(cfg.train.seed))))
  model_config = config_lib.bert_config(cfg, None)
  source = cfg.init_from or f"teacher={cfg.teacher} (every_k)"
  merged = weights.merge_pretrained(fresh["student"], weights.in_layout(start, model_config),
                                    source)
  return {**fresh, "student": merged.params}


def _train_iterator(cfg: ml_collections.ConfigDict, features: dict[str, np.ndarray]
                    ) -> loader.TrainIterator:
  """As `finetuning.train_iterator`, over the training features with any cached teacher
  outputs beside them (a per-token field is cut to the length buckets with the tokens)."""
  data = cfg.data
  return loader.feature_train_iterator(
      features, loader.HostLayout.of_process(runtime.per_host_batch_size(cfg)),
      seed=data.seed, length_buckets=config_lib.length_buckets(data),
      group_by_length=data.group_by_length)


def distill(cfg: ml_collections.ConfigDict, workdir: str,
            allow_config_change: bool = False) -> tuple[loop.TrainResult, int | None]:
  """Reads the teacher and the data, builds the student and runs the shared loop.

  Returns the loop's result and the step of the best checkpoint.
  """
  validate_finetune(cfg)
  config_lib.validate_distill(cfg)
  teacher = load_teacher(cfg)
  start = student.take_architecture(cfg, teacher)
  config_lib.validate_model(cfg)
  config_lib.validate_mesh(cfg)
  runtime.preflight(cfg)
  kind, data = cfg.task, cfg.data
  if teacher.config.max_position_embeddings < data.max_seq_length:
    config_lib.fail("data.max_seq_length", data.max_seq_length, f"exceeds the teacher's "
                    f"{teacher.config.max_position_embeddings} positions")
  settings = loss_settings(cfg, teacher)
  label_names = teacher.label_names
  train, _ = load_split(kind, data, finetuning.split_path(data, "train"),
                        teacher.tokenizer.backend, label_names, data.max_train_examples)
  dev, _ = load_split(kind, data, finetuning.split_path(data, "dev"), teacher.tokenizer.backend,
                      label_names, data.max_eval_examples)
  logging.info("distilling %s (%s) into a %d-layer student: %d train, %d dev features", teacher.path,
               teacher.source, cfg.model.num_layers, len(train), len(dev))
  finetuning.resolve_schedule(cfg, len(train), dev)
  finetuning.resolve_length_buckets(cfg, train, jax.devices()[0].platform)
  config_lib.validate_optim(cfg)
  config_lib.validate_train(cfg)
  task, init_trainable, teacher_task = _tasks(cfg, teacher, dev, settings)
  initial = initial_trainable(cfg, start, init_trainable)
  workdir_lib.prepare_workdir(workdir, cfg, allow_config_change)
  workdir_lib.write_resolved_config(workdir, cfg)
  workdir_lib.save_run_files(workdir, kind, label_names, teacher.tokenizer)
  keeper = StudentBest(workdir, cfg.train.best_metric or TASKS[kind].main_metric,
                       cfg.train.best_mode, cfg.train.early_stopping_patience,
                       cfg.train.eval_every)
  features, plan, frozen = train.device_arrays(), None, None
  if cfg.distill.teacher_cache:
    features.update(cache.teacher_outputs(cfg, teacher, teacher_task, features))
  else:
    plan = Parts(cfg.distill.teacher_dtype)
    frozen = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(cfg.distill.teacher_dtype)),
                          teacher.params)
  train_iter = _train_iterator(cfg, features)
  meta = {"config": cfg.to_dict(), "task": kind, "label_names": label_names}
  try:
    result = loop.train(
        cfg, workdir, task, train_iter,
        finetuning.dev_batches(cfg, dev),
        meta, initial_params=initial, best=keeper, plan=plan, frozen=frozen)
  finally:
    keeper.close()
  return result, keeper.best_step()
