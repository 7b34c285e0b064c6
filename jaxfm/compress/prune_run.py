"""Pruning runs (`jaxfm.prune`): a fine-tuned workdir's heads and FFN neurons ranked on a few
training batches (`pruning`), sliced away, and the smaller model written as a fine-tuning
workdir: config.json (its `model` section the smaller architecture), task.json, tokenizer/,
best/ (the pruned params at step 0, scored on the dev split) and pruning.json (what was
removed, the parameter counts, the dev metrics, the config the command was given).

With `prune.recovery_epochs` > 0 that workdir is WORKDIR/pruned and the same command then
trains from it into WORKDIR (`prune.recovery`: fine-tuning, or distillation with the unpruned
`init_from` as the teacher), so that `evaluate`, `predict` and `convert` read the recovered
model; WORKDIR/pruning.json adds the recovery's steps and best dev metrics to the pruned
model's. The same command again goes on where it stopped: a finished pruning is not redone,
the recovery resumes from its last checkpoint; a changed config is refused (as a fine-tuning
resume refuses it).

A quantization-aware workdir (`quantize.qat`) is pruned from its float params and scored in
float (a warning says so: recover it with the same `quantize.qat`, which a recovery by
fine-tuning trains with); an int8 folder is refused (prune the workdir it was quantized from).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from jaxfm import config as config_lib
from jaxfm import distillation, runtime, sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import is_int8_dir, pruning, qat_mode
from jaxfm.finetuning import run as finetuning
from jaxfm.models import BertConfig, unstack_layers
from jaxfm.tasks import TASKS, load_split, make_task, validate_finetune
from jaxfm.train import best, loop

INFO_FILE = "pruning.json"
PRUNED_DIR = "pruned"  # with a recovery: the pruned model before it, a workdir of its own
_CONFIG_KEY = "config"  # pruning.json's copy of the config the command was given


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What a pruning command did: pruning.json's record (less the config) and the recovery's
  result (None without a recovery)."""

  info: dict[str, Any]
  recovery: loop.TrainResult | None = None


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
                    "ranked, pruned and scored in float; recover them with quantize.qat=%s "
                    "(and prune.recovery_epochs)", path, mode, mode)
  config = config_lib.bert_config(run.cfg, jax.devices()[0].platform).replace(
      scan_layers=False, remat_policy="none")
  loaded = weights.workdir_params(path)
  return run, config, unstack_layers(loaded.params), loaded.describe()


def pruned_dir(workdir: str) -> str:
  """Where a command with a recovery keeps the pruned model before it: a workdir of its own."""
  return str(workdir_lib.absolute(workdir) / PRUNED_DIR)


def _make_room(workdir: str, recovering: bool) -> None:
  """Checks that `workdir` is new or empty; with a recovery, removes the pruned model an
  interrupted command left unfinished there (its only entry, without pruning.json), to prune
  it anew.

  Raises:
    WorkdirError: `workdir` holds anything else.
  """
  root = epath.Path(workdir)
  names = {path.name for path in root.iterdir()} if root.exists() else set()
  if recovering and names == {PRUNED_DIR}:
    logging.warning("%s holds an unfinished pruning (no %s): pruning again", root / PRUNED_DIR,
                    INFO_FILE)
    if jax.process_index() == 0:
      (root / PRUNED_DIR).rmtree()
  elif names:
    raise workdir_lib.WorkdirError(f"workdir {workdir} is not empty: a pruning run writes a new "
                                   "workdir")


def _finished(workdir: str, target: str, given: dict[str, Any],
              allow_config_change: bool) -> dict[str, Any] | None:
  """The record (pruning.json, less the config) of the command's pruning finished into
  `target` (`workdir` or its pruned/), checked to come from the config `given`; None when
  there is none.

  Raises:
    WorkdirError: it was pruned with another config, and not `allow_config_change`.
  """
  path = epath.Path(target) / INFO_FILE
  if not path.exists():
    return None
  info = json.loads(path.read_text())
  changes = workdir_lib.config_changes(info.pop(_CONFIG_KEY, {}), given)
  if changes and not allow_config_change:
    raise workdir_lib.WorkdirError(
        f"{workdir} holds a pruning run with a different config; pass --allow_config_change to go "
        "on with its pruned model anyway, or use a new workdir:\n  " + "\n  ".join(changes))
  logging.info("%s was pruned already (%s): not pruned again", target, INFO_FILE)
  return info


def _record(workdir: str, info: dict[str, Any], given: dict[str, Any]) -> None:
  """Writes `info` and the config the command was `given` to WORKDIR/pruning.json."""
  if jax.process_index() == 0:
    (epath.Path(workdir) / INFO_FILE).write_text(json.dumps({**info, _CONFIG_KEY: given},
                                                            indent=2))


def _scores(cfg: ml_collections.ConfigDict, config: BertConfig, params: Any, run: Any,
            train: Any) -> pruning.Scores:
  if cfg.prune.importance == "magnitude":
    return pruning.magnitude_scores(params, config)
  task = make_task(cfg.task, config, run.label_names, None, cfg.data)
  batches = itertools.islice(train.eval_batches(cfg.train.batch_size, 0, 1), cfg.prune.batches)
  return pruning.gradient_scores(task.loss_fn, params, config, batches)


def recovery_config(cfg: ml_collections.ConfigDict, pruned: str) -> ml_collections.ConfigDict:
  """The recovery's config: the fine-tuning fields of the pruning config `cfg` (task, data,
  optim, train, the model's compute fields, mesh, quantize), from the pruned workdir `pruned`,
  for `prune.recovery_epochs` epochs; to distil, also its `distill` section, with the unpruned
  `init_from` as the teacher and the pruned model as the student."""
  distil = cfg.prune.recovery == "distill"
  out = config_lib.distill_defaults() if distil else config_lib.finetune_defaults()
  for name in out.keys():
    if name in cfg:
      out[name] = copy.deepcopy(cfg[name])
  out.unlock()  # as a fine-tuning config file gives it
  out.init_from = pruned
  out.train.epochs = cfg.prune.recovery_epochs
  if distil:
    out.teacher = cfg.init_from
    out.distill.student_init = "init_from"
  return out


def prune(cfg: ml_collections.ConfigDict, workdir: str,
          allow_config_change: bool = False) -> Outcome:
  """Prunes `cfg.init_from` into the new `workdir` (with `prune.recovery_epochs` > 0: into
  WORKDIR/pruned, then recovers it into `workdir`), or goes on with such a command that
  stopped; returns what pruning.json records (less the config) and the recovery's result.

  Raises:
    ConfigError: a bad field (naming it), or a source workdir of another task.
    WorkdirError: `workdir` holds anything but this command's run, or one of another config
      (unless `allow_config_change`).
  """
  validate_finetune(cfg)
  config_lib.validate_prune(cfg)
  given = json.loads(json.dumps(cfg.to_dict()))  # as config.json and pruning.json hold it
  recovering = cfg.prune.recovery_epochs > 0
  target = pruned_dir(workdir) if recovering else workdir
  recovery = recovery_config(cfg, target) if recovering else None
  if recovery is not None and cfg.prune.recovery == "distill":
    config_lib.validate_distill(recovery)  # before the pruning, which it would follow
  info = _finished(workdir, target, given, allow_config_change)
  if info is None:
    _make_room(workdir, recovering)
    info = _prune_into(copy.deepcopy(cfg), target)
    _record(target, info, given)
  if recovery is None:
    return Outcome(info)
  return _recover(recovery, workdir, info, given, allow_config_change)


def _recover(cfg: ml_collections.ConfigDict, workdir: str, info: dict[str, Any],
             given: dict[str, Any], allow_config_change: bool) -> Outcome:
  """Trains the recovery `cfg` into `workdir`, or resumes it; once it finished, records its
  best dev metrics (what `evaluate` scores) beside the pruned model's in WORKDIR/pruning.json."""
  distil = "teacher" in cfg
  train = distillation.distill if distil else finetuning.finetune
  result, best_step = train(cfg, workdir, allow_config_change)
  if result.preempted:
    return Outcome(info, result)
  metrics = finetuning.evaluate(workdir, "dev")  # a distillation logs its own losses instead
  info = {**info, "pruned_workdir": cfg.init_from,
          "recovery": {"method": "distill" if distil else "finetune", "epochs": cfg.train.epochs,
                       "step": result.step, "best_step": best_step, "dev": metrics}}
  _record(workdir, info, given)
  logging.info("recovered %s into %s: dev %s", cfg.init_from, workdir, metrics)
  return Outcome(info, result)


def _prune_into(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Prunes `cfg.init_from` into `workdir`, a fine-tuning workdir of the pruned model scored in
  float (`cfg` takes its architecture and resolved fields); returns its record."""
  run, config, params, origin = _source(cfg)
  kind, data = cfg.task, cfg.data
  cfg.quantize.qat = ""  # the recovery's: the pruned model is scored in float
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
  logging.info("pruned %s into %s: %s", cfg.init_from, os.fspath(workdir), info)
  return info
