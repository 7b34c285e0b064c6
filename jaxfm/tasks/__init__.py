"""Task kinds, registered in one place.

`TASKS[cfg.task]` gives a fine-tuning kind's head, loss, reader, feature converter, scores,
predictions and config checks (one file each: `classification.py` with pairs and regression,
`ner.py`, `qa.py`); `mlm.mlm_task` is pretraining's. What they share is in `base.py`.
Everything else (the loop, checkpoints, sharding, logging) is shared between them all.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import ml_collections
import numpy as np

from jaxfm import config as config_lib
from jaxfm.data.packing import Packing
from jaxfm.models import BertConfig
from jaxfm.tasks import classification, ner, qa
from jaxfm.tasks.base import Features, TaskKind, TaskSplit, predict_outputs, summarize
from jaxfm.tasks.mlm import mlm_task
from jaxfm.train.loop import Task

__all__ = ["TASKS", "Features", "TaskKind", "TaskSplit", "load_split", "load_unlabelled",
           "make_task", "mlm_task", "packing", "validate_finetune"]

TASKS: dict[str, TaskKind] = {
    "classification": classification.CLASSIFICATION,
    "regression": classification.REGRESSION,
    "ner": ner.NER,
    "qa": qa.QA,
}


def validate_finetune(cfg: ml_collections.ConfigDict) -> None:
  """Checks a fine-tuning config before the data is read: the task kind and the fields it
  reads, then the fields every kind shares (`config.validate_finetune`)."""
  config_lib.one_of(cfg, "task", tuple(TASKS))
  kind = TASKS[cfg.task]
  if cfg.data.tfds_name and not kind.reads_tfds:
    config_lib.fail("data.tfds_name", cfg.data.tfds_name,
                    f"is supported for classification only, not task={cfg.task!r}")
  kind.validate(cfg)
  if cfg.data.packing:
    if not kind.packs:
      config_lib.fail("data.packing", cfg.data.packing,
                      f"is not supported for task={cfg.task!r}: its features are long windows "
                      "that leave nothing to pack")
    if not 1 <= cfg.data.max_examples_per_row <= cfg.data.max_seq_length // 2:
      config_lib.fail("data.max_examples_per_row", cfg.data.max_examples_per_row,
                      f"must be in [1, data.max_seq_length // 2 = {cfg.data.max_seq_length // 2}]")
  config_lib.validate_finetune(cfg)


def packing(data: ml_collections.ConfigDict) -> Packing | None:
  """The rows `data.packing` packs features into (None when off, or in a config saved before
  the field existed)."""
  if not data.get("packing", False):
    return None
  return Packing(data.max_seq_length, data.max_examples_per_row)


def make_task(kind: str, config: BertConfig, label_names: Sequence[str] | None,
              split: TaskSplit | None, data: ml_collections.ConfigDict) -> Task:
  """The loop's `Task` for `kind`; `split` is the eval split its `score` refers to."""
  spec = TASKS[kind]
  model = spec.model(config, label_names)
  ids = np.zeros((1, data.max_seq_length), np.int32)
  score = None if split is None else (
      lambda outputs: spec.score(split, outputs, label_names, data))
  packed = packing(data)
  flops_per_token = functools.partial(spec.flops_per_token, config)
  if packed and spec.packs == "examples":  # the last layer runs at every [CLS] slot
    flops_per_token = functools.partial(flops_per_token, examples_per_row=packed.max_per_row)
  return Task(model=model, init_inputs=(ids, ids, np.ones_like(ids)), loss_fn=spec.loss(model),
              summarize=summarize, flops_per_token=flops_per_token,
              batch_spec=spec.batch_spec(data.max_seq_length,
                                         packed.max_per_row if packed else 0),
              predict_fn=predict_outputs(model, spec.outputs, spec.packs), score=score)


def load_split(kind: str, data: ml_collections.ConfigDict, path: str, tokenizer: Any,
               label_names: Sequence[str] | None,
               limit: int = 0) -> tuple[TaskSplit, list[str] | None]:
  """Reads and converts one split (the first `limit` examples when > 0).

  Returns the split and the label names: the given ones, or (given None) the vocabulary of
  this split's labels, for the training split.
  """
  spec = TASKS[kind]
  examples = spec.read(data, path, label_names)
  if not examples:
    raise ValueError(f"{path}: no examples")
  if limit:
    examples = examples[:limit]
  if label_names is None and spec.label_vocab is not None:
    label_names = spec.label_vocab(examples)
  label_names = None if label_names is None else list(label_names)
  split = TaskSplit(examples, spec.convert(examples, tokenizer, data, label_names),
                    spec.device_fields, packing(data))
  return split, label_names


def load_unlabelled(kind: str, data: ml_collections.ConfigDict, path: str, tokenizer: Any,
                    label_names: Sequence[str] | None) -> TaskSplit:
  """Reads a JSONL file of inputs to predict (see README: fields per task)."""
  spec = TASKS[kind]
  examples = spec.read_unlabelled(data, path, label_names)
  if not examples:
    raise ValueError(f"{path}: no inputs")
  return TaskSplit(examples, spec.convert(examples, tokenizer, data, label_names),
                   spec.device_fields, packing(data))
