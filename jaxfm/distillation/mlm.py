"""Task-agnostic distillation on the pretraining corpus (DistilBERT, Sanh et al. 2019):
`python -m jaxfm.distill` with `task='mlm'` (`config.distill_mlm_defaults`).

An MLM teacher ('hf:DIR', a jaxfm model dir or a pretraining workdir) and the student read
pretraining's masked batches; the losses are the soft-target KL over the vocabulary at the
masked positions (`kl`), the student's own MLM loss (`task`) and the cosine distance between
the last hidden states at every real token (`cosine`). The teacher is the step's frozen
argument, as for fine-tuned teachers (`run.Parts`). A finished run also writes the student as
a jaxfm model dir, `WORKDIR/student`, that `jaxfm.finetune` takes as `init_from`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jaxfm import config as config_lib
from jaxfm import interop, runtime, weights
from jaxfm import workdir as workdir_lib
from jaxfm.data import loader
from jaxfm.distillation import capture, losses, run, student
from jaxfm.distillation.teacher import load_mlm_teacher
from jaxfm.models import BertForMaskedLM
from jaxfm.models.encoder import at_positions
from jaxfm.pretraining.run import pretraining_data
from jaxfm.tasks import mlm_task
from jaxfm.tasks.base import apply_kwargs
from jaxfm.train import checkpoint, loop
from jaxfm.train.step import Batch, LossFn, Sums

STUDENT_DIR = "student"  # under the workdir: the finished student as a jaxfm model dir


def _masked_logits(model: BertForMaskedLM, params: Any, batch: Batch, rng: jax.Array | None
                   ) -> tuple[jax.Array, capture.Captured]:
  """The MLM logits [b, p, vocab] float32 at the masked positions, from a forward whose last
  layer runs at every position (for the cosine loss), and what it captured."""
  with capture.capturing() as found:
    features, table, bias = model.apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"],
        batch["attention_mask"], None, method=BertForMaskedLM.decoder_inputs,
        **apply_kwargs(rng))  # features [b, t, embedding]
  masked = at_positions(features, batch["masked_positions"]).astype(jnp.float32)  # [b, p, e]
  logits = masked @ table.astype(jnp.float32).T + bias.astype(jnp.float32)
  return logits, found


def mlm_distill_loss(student_model: BertForMaskedLM, teacher_model: BertForMaskedLM,
                     loss_weights: dict[str, float], temperature: float) -> LossFn:
  """DistilBERT's weighted sum over one masked batch (see the module docstring).

  Sums: `loss_sum` the weighted total, `weight` and `correct` (the student's MLM accuracy) per
  masked token, and `<name>_sum` per loss; cosine, a per-batch mean over real tokens, counts
  times the batch's masked tokens, which the step divides by.
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    logits_s, found_s = _masked_logits(student_model, params["student"], batch, rng)
    logits_t, found_t = _masked_logits(teacher_model, params["teacher"], batch, None)
    logits_t = jax.lax.stop_gradient(logits_t)
    weights = batch["masked_weights"]  # [b, p]
    log_p = jax.nn.log_softmax(logits_s, axis=-1)
    nll = -jnp.take_along_axis(log_p, batch["masked_ids"][..., None], axis=-1)[..., 0]  # [b, p]
    correct = jnp.argmax(logits_s, axis=-1) == batch["masked_ids"]
    count = jnp.sum(weights)
    parts = {"task": jnp.sum(nll * weights),
             "kl": losses.soft_target_kl(logits_s, logits_t, weights, temperature)}
    if "cosine" in loss_weights:
      last_s = found_s.hidden[student_model.config.num_layers]  # [b, t, d]
      last_t = jax.lax.stop_gradient(found_t.hidden[teacher_model.config.num_layers])
      parts["cosine"] = count * losses.cosine_distance(last_s, last_t, batch["attention_mask"])
    total = sum(weight * parts[name] for name, weight in loss_weights.items())
    return total, {"loss_sum": total, "weight": count, "correct": jnp.sum(correct * weights),
                   **{f"{n}_sum": v for n, v in parts.items()}}
  return loss_fn


def _tokenizer(cfg: ml_collections.ConfigDict, teacher_tokenizer: str | None) -> None:
  """`data.tokenizer`: the teacher's when ''."""
  if cfg.data.tokenizer:
    return
  if teacher_tokenizer is None:
    config_lib.fail("data.tokenizer", "", f"must name the teacher's tokenizer: teacher="
                    f"{cfg.teacher!r} holds none")
  with cfg.unlocked():
    cfg.data.tokenizer = teacher_tokenizer


def _export_student(cfg: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the newest checkpoint's student to `WORKDIR/student` (process 0)."""
  if jax.process_index() != 0:
    return
  _, params = checkpoint.restore_latest_params(workdir)
  config = config_lib.bert_config(cfg, None).replace(scan_layers=False, remat_policy="none")
  tokenizer = workdir_lib.tokenizer_dir(workdir)
  files = [str(p) for p in tokenizer.iterdir()] if tokenizer.exists() else []
  out = os.path.join(workdir, STUDENT_DIR)
  interop.save_model_dir(out, config, weights.in_layout(params["student"], config), files)
  logging.info("wrote the student to %s", out)


def distill_mlm(cfg: ml_collections.ConfigDict, workdir: str,
                allow_config_change: bool = False) -> tuple[loop.TrainResult, None]:
  """Reads the teacher and the corpus, builds the student and runs the shared loop; returns
  the loop's result (and no best step: pretraining keeps none)."""
  config_lib.validate_distill(cfg)
  teacher, teacher_tokenizer = load_mlm_teacher(cfg)
  start = student.take_architecture(cfg, teacher)
  _tokenizer(cfg, teacher_tokenizer)
  if "cosine" in config_lib.distill_losses(cfg.distill) and (
      cfg.model.hidden_size != teacher.config.hidden_size):
    config_lib.fail("model.hidden_size", cfg.model.hidden_size, f"must equal the teacher's "
                    f"{teacher.config.hidden_size} for the cosine loss")
  config_lib.validate(cfg)
  runtime.preflight(cfg)
  workdir_lib.prepare_workdir(workdir, cfg, allow_config_change)
  layout = loader.HostLayout.of_process(runtime.per_host_batch_size(cfg), cfg.data.num_shards)
  data = pretraining_data(cfg, workdir, layout)
  if data.tokenizer.vocab_size != teacher.config.vocab_size:
    config_lib.fail("data.tokenizer", cfg.data.tokenizer, f"has {data.tokenizer.vocab_size} "
                    f"tokens, the teacher's vocabulary {teacher.config.vocab_size}")
  workdir_lib.write_resolved_config(workdir, cfg)
  platform = jax.devices()[0].platform
  seq, predictions = cfg.data.max_seq_length, cfg.data.max_predictions_per_seq
  student_task = mlm_task(config_lib.bert_config(cfg, platform), seq, predictions)
  teacher_task = mlm_task(teacher.config.replace(
      cpu_paths=config_lib.use_cpu_paths(cfg, platform)), seq, predictions)
  loss_weights = config_lib.distill_losses(cfg.distill)
  fields = {f.name: getattr(student_task, f.name) for f in dataclasses.fields(loop.Task)}
  fields.update(summarize=run.summarize_parts(student_task.summarize), loss_fn=mlm_distill_loss(
      student_task.model, teacher_task.model, loss_weights, cfg.distill.temperature))

  def init_trainable(rng: jax.Array) -> dict[str, Any]:
    return {"student": student_task.init_params(rng)}
  task = run.DistillTask(**fields, init_fn=lambda rng: {
      **init_trainable(rng), "teacher": teacher_task.init_params(jax.random.fold_in(rng, 2))})
  initial = run.initial_trainable(cfg, start, init_trainable)
  logging.info("distilling %s (%s) into a %d-layer student on the pretraining corpus",
               teacher.path, teacher.source, cfg.model.num_layers)
  frozen = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(cfg.distill.teacher_dtype)),
                        teacher.params)
  train_iter = data.train_iterator(layout, seed=cfg.data.seed, worker_count=cfg.data.worker_count)
  eval_batches = lambda: itertools.islice(data.eval_batches(layout), cfg.train.eval_batches)
  meta = {"config": cfg.to_dict(), "data_counters": data.counters}
  try:
    result = loop.train(cfg, workdir, task, train_iter, eval_batches, meta,
                        initial_params=initial, plan=run.Parts(cfg.distill.teacher_dtype),
                        frozen=frozen)
  finally:
    train_iter.close()
  if not result.preempted:
    _export_student(cfg, workdir)
  return result, None
