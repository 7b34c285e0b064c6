"""MLM pretraining runs: `pretrain` builds the corpus, tokenizer, masked batches and the MLM
task from a config and runs the shared loop in a workdir; `report` sums the run up."""

from __future__ import annotations

import itertools

import jax
import ml_collections

from jaxfm import config as config_lib
from jaxfm import runtime, weights
from jaxfm import workdir as workdir_lib
from jaxfm.data import loader, mlm_data, prepared
from jaxfm.tasks import mlm_task
from jaxfm.train import checkpoint, loop

# Errors the entry point turns into one `error: ...` line and exit code 1.
USER_ERRORS = (config_lib.ConfigError, workdir_lib.WorkdirError, checkpoint.CheckpointError,
               loop.NonFiniteError, prepared.PreparedError)


def pretraining_data(cfg: ml_collections.ConfigDict, workdir: str,
                     layout: loader.HostLayout) -> mlm_data.MlmData:
  """This host's shards: from `data.prepared` when set, else read and packed now."""
  tokenizer_dir = str(workdir_lib.tokenizer_dir(workdir))
  if not cfg.data.prepared:
    return mlm_data.build_pretraining_data(
        cfg.data, tokenizer_dir, max_position_embeddings=cfg.model.max_position_embeddings,
        shards=layout.shards)
  try:
    return prepared.load_prepared(cfg.data, tokenizer_dir, shards=layout.shards)
  except prepared.SettingsMismatch as e:
    raise config_lib.ConfigError(str(e)) from e


def pretrain(cfg: ml_collections.ConfigDict, workdir: str,
             allow_config_change: bool = False) -> loop.TrainResult:
  """Builds data, model and task from `cfg` and runs the loop."""
  config_lib.validate(cfg)
  runtime.preflight(cfg)
  workdir_lib.prepare_workdir(workdir, cfg, allow_config_change)
  layout = loader.HostLayout.of_process(runtime.per_host_batch_size(cfg), cfg.data.num_shards)
  data = pretraining_data(cfg, workdir, layout)
  with cfg.unlocked():
    cfg.model.vocab_size = data.tokenizer.vocab_size
  workdir_lib.write_resolved_config(workdir, cfg)
  model_config = config_lib.bert_config(cfg, jax.devices()[0].platform)
  task = mlm_task(model_config, cfg.data.max_seq_length, cfg.data.max_predictions_per_seq)
  train_iter = data.train_iterator(layout, seed=cfg.data.seed, worker_count=cfg.data.worker_count)
  eval_batches = lambda: itertools.islice(data.eval_batches(layout), cfg.train.eval_batches)
  meta = {"config": cfg.to_dict(), "data_counters": data.counters}
  try:
    return loop.train(cfg, workdir, task, train_iter, eval_batches, meta,
                      initial_params=(weights.load_initial_params(cfg.init_from, model_config,
                                                                  "mlm")
                                      if cfg.init_from else None))
  finally:
    train_iter.close()


def report(workdir: str, result: loop.TrainResult) -> None:
  """Prints held-out MLM loss/accuracy at the first and last evaluation (process 0, the only
  one that writes the metrics: on an object store they appear only once written whole)."""
  if jax.process_index() != 0:
    return
  evals = [r for r in workdir_lib.read_metrics(workdir) if r["split"] == "eval"]
  if not evals:
    return
  first, last = evals[0], evals[-1]
  print(f"held-out MLM: step {first['step']}: loss {first['loss']:.3f} accuracy "
        f"{first['accuracy']:.3f}  ->  step {last['step']}: loss {last['loss']:.3f} accuracy "
        f"{last['accuracy']:.3f}" + ("  (preempted; rerun to resume)" if result.preempted else ""))
