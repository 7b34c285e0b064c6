"""Pruning runs (`jaxfm.prune`): a fine-tuned workdir's heads and FFN neurons ranked on a few
training batches (`pruning`), sliced away, and the smaller model written as a new fine-tuning
workdir: config.json (its `model` section the smaller architecture), task.json, tokenizer/,
best/ (the pruned params at step 0, scored on the dev split) and pruning.json (what was
removed, the parameter counts, the dev metrics). `evaluate`, `predict` and `convert` read it
as any workdir; `jaxfm.finetune --config.init_from=<it>` fine-tunes it further (recovery).

A quantization-aware workdir (`quantize.qat`) is pruned from its float params and scored in
float (a warning says so: recover it with the same `quantize.qat`); an int8 folder is refused
(prune the workdir it was quantized from).
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from jaxfm import config as config_lib
from jaxfm import runtime, sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import is_int8_dir, pruning, qat_mode
from jaxfm.finetuning import run as finetuning
from jaxfm.models import BertConfig, unstack_layers
from jaxfm.tasks import TASKS, load_split, make_task, validate_finetune
from jaxfm.train import best, loop

INFO_FILE = "pruning.json"


def _source(cfg: ml_collections.ConfigDict) -> tuple[workdir_lib.SavedRun, BertConfig, Any, str]:
  """The fine-tuned run `init_from`: its files, architecture (unscanned), best (else latest)
  params (unscanned host arrays) and which checkpoint they are."""
  path = cfg.init_from
  run = finetuning.load_finetuned("init_from", path, cfg.task)
  if finetuning.is_peft_run(run.cfg):
    config_lib.fail("init_from", path, f"trained a {run.cfg.peft.method} adapter: export it "
                    "merged (jaxfm.convert --to_hf), fine-tune that, and prune the result")
  if is_int8_dir(path):
    config_lib.fail("init_from", path, "is an int8 folder (jaxfm.quantize): prune the "
                    "fine-tuning workdir it was quantized from, then quantize the pruned one")
  if mode := qat_mode(run.cfg):
    logging.warning("init_from=%s trained for int8 (quantize.qat=%s): its float params are "
                    "ranked, pruned and scored in float; recover the pruned workdir with "
                    "quantize.qat=%s", path, mode, mode)
  config = config_lib.bert_config(run.cfg, jax.devices()[0].platform).replace(
      scan_layers=False, remat_policy="none")
  loaded = weights.workdir_params(path)
  return run, config, unstack_layers(loaded.params), loaded.describe()


def _check_empty(workdir: str) -> None:
  root = epath.Path(workdir)
  if root.exists() and any(root.iterdir()):
    raise workdir_lib.WorkdirError(f"workdir {workdir} is not empty: a pruning run writes a new "
                                   "workdir")


def _scores(cfg: ml_collections.ConfigDict, config: BertConfig, params: Any, run: Any,
            train: Any) -> pruning.Scores:
  if cfg.prune.importance == "magnitude":
    return pruning.magnitude_scores(params, config)
  task = make_task(cfg.task, config, run.label_names, None, cfg.data)
  batches = itertools.islice(train.eval_batches(cfg.train.batch_size, 0, 1), cfg.prune.batches)
  return pruning.gradient_scores(task.loss_fn, params, config, batches)


def prune(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Prunes `cfg.init_from` into the new `workdir`; returns what pruning.json records.

  Raises:
    ConfigError: a bad field (naming it), or a source workdir of another task.
    WorkdirError: `workdir` is not empty.
  """
  validate_finetune(cfg)
  config_lib.validate_prune(cfg)
  _check_empty(workdir)
  run, config, params, origin = _source(cfg)
  kind, data = cfg.task, cfg.data
  train, _ = load_split(kind, data, finetuning.split_path(data, "train"), run.tokenizer.backend,
                        run.label_names, data.max_train_examples)
  dev, _ = load_split(kind, data, finetuning.split_path(data, "dev"), run.tokenizer.backend,
                      run.label_names, data.max_eval_examples)
  scores = _scores(cfg, config, params, run, train)
  kept = pruning.plan(config, scores, cfg.prune.heads_share, cfg.prune.ffn_share)
  pruned, small = pruning.apply(params, config, kept)
  config_lib.take_architecture(cfg, small)
  config_lib.validate_model(cfg)
  config_lib.validate_mesh(cfg)
  runtime.preflight(cfg)
  finetuning.resolve_schedule(cfg, len(train), dev)
  finetuning.resolve_length_buckets(cfg, train, jax.devices()[0].platform)
  config_lib.validate_optim(cfg)
  config_lib.validate_train(cfg)
  model_config = config_lib.bert_config(cfg, jax.devices()[0].platform)
  task = make_task(kind, model_config, run.label_names, dev, data)
  mesh = loop.make_mesh(cfg)
  steps = loop.build_steps(cfg, task, mesh)
  placed = jax.device_put(weights.in_layout(pruned, model_config), steps.state_shardings.params)
  with sharding.activation_sharding(mesh):
    metrics = loop.evaluate(task, steps, placed, finetuning.dev_batches(cfg, dev)(), mesh)
  workdir_lib.prepare_workdir(workdir, cfg, allow_config_change=False)
  workdir_lib.write_resolved_config(workdir, cfg)
  workdir_lib.save_run_files(workdir, kind, run.label_names, run.tokenizer)
  keeper = best.BestCheckpoint(workdir, cfg.train.best_metric or TASKS[kind].main_metric,
                               cfg.train.best_mode, 0, 1)
  keeper.update(0, placed, metrics)
  keeper.close()
  info = {"origin": f"{origin} of {workdir_lib.absolute(cfg.init_from)}",
          "importance": cfg.prune.importance, "heads_share": cfg.prune.heads_share,
          "ffn_share": cfg.prune.ffn_share,
          "heads": [small.layer_heads(i) for i in range(small.num_layers)],
          "pruned_heads": [list(h) for h in small.pruned_heads],
          "intermediate_size": [config.intermediate_size, small.intermediate_size],
          "params": [pruning.count_params(params), pruning.count_params(pruned)],
          "dev": metrics}
  if jax.process_index() == 0:
    (epath.Path(workdir) / INFO_FILE).write_text(json.dumps(info, indent=2))
  logging.info("pruned %s into %s: %s", cfg.init_from, os.fspath(workdir), info)
  return info
