"""Fine-tuning task kinds, registered in one place: `TASKS[cfg.task]` gives the head, the loss, the
reader, the feature converter, the scores and the predictions of a task kind.

Everything else (the loop, checkpoints, sharding, logging) is shared with pretraining. A
split becomes `TaskSplit`: its examples, host-side features (offsets, word maps) and the
fixed-shape arrays the device sees, each row carrying `weights` (0 = padding) and
`feature_index` (-1 = padding) so eval outputs can be matched back to their features.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jaxfm.data import loader
from jaxfm.data.tasks import classification, ner, qa
from jaxfm.metrics import classification as cls_metrics
from jaxfm.metrics import ner as ner_metrics
from jaxfm.metrics import squad as squad_metrics
from jaxfm.models import (BertConfig, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification)
from jaxfm.train import losses
from jaxfm.train.flops import classification_flops_per_token, encoder_flops_per_token
from jaxfm.train.loop import Task

Features = dict[str, np.ndarray]
INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# Architecture fields that come from the `init_from` checkpoint, not from the config.
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size", "embedding_size", "hidden_act",
                "layer_norm_eps")


@dataclasses.dataclass(frozen=True)
class TaskSplit:
  """One split: examples, all features, and the names of the fields the device needs."""

  examples: list[Any]
  features: Features
  device_fields: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.features["input_ids"])

  def device_arrays(self) -> Features:
    """The device fields plus `weights` (1) and `feature_index` (row number)."""
    n = len(self)
    return {**{k: self.features[k] for k in self.device_fields},
            "weights": np.ones(n, np.float32), "feature_index": np.arange(n, dtype=np.int32)}

  def eval_batches(self, batch_size_per_host: int, shard_index: int, shard_count: int,
                   length_buckets: Sequence[int] = ()) -> Iterator[Features]:
    """This host's rows `shard_index::shard_count` in batches; every host yields the same
    number of batches, the last ones padded with `weights` 0 and `feature_index` -1.

    With `length_buckets` (ascending, ending with the features' length) the rows go by
    length, shortest first, and each batch is cut to the shortest bucket that holds the
    longest row of that batch on any host (`loader.cut_to_bucket`).
    """
    arrays = self.device_arrays()
    lengths = arrays["attention_mask"].sum(axis=1)
    cut = len(length_buckets) > 1
    order = np.argsort(lengths, kind="stable") if cut else np.arange(len(self))
    shares = [order[host::shard_count] for host in range(shard_count)]
    for b in range(self.num_eval_batches(batch_size_per_host, shard_count)):
      window = slice(b * batch_size_per_host, (b + 1) * batch_size_per_host)
      rows = shares[shard_index][window]
      fill = batch_size_per_host - len(rows)
      batch = {k: v[np.concatenate([rows, np.zeros(fill, int)])] for k, v in arrays.items()}
      batch["weights"][len(rows):] = 0.0
      batch["feature_index"][len(rows):] = -1
      if cut:
        longest = max(lengths[share[window]].max(initial=1) for share in shares)
        batch = loader.cut_to_bucket(batch, longest, length_buckets)
      yield batch

  def num_eval_batches(self, batch_size_per_host: int, shard_count: int) -> int:
    return math.ceil(math.ceil(len(self) / shard_count) / batch_size_per_host)


@dataclasses.dataclass(frozen=True)
class TaskKind:
  """What differs between fine-tuning tasks.

  Attributes:
    model: (architecture, number of labels) -> the Flax task model.
    loss: model -> `LossFn`.
    outputs: names of the model's outputs in eval/predict results.
    device_fields: feature arrays the loss needs (besides weights / feature_index).
    read: (data config, path, label names | None) -> labelled examples.
    read_unlabelled: (data config, JSONL path, label names) -> examples to predict.
    label_vocab: examples -> label names (None: the task has no label vocabulary).
    convert: (examples, tokenizer, data config, label names) -> features.
    score: (split, outputs, label names, data config) -> metrics.
    predictions: (split, outputs, label names, data config) -> one JSON row per example.
    main_metric: the default `train.best_metric`.
    flops_per_token: (architecture, sequence length) -> training FLOPs per token.
  """

  model: Callable[[BertConfig, int], nn.Module]
  loss: Callable[[nn.Module], losses.LossFn]
  outputs: tuple[str, ...]
  device_fields: tuple[str, ...]
  read: Callable[..., list[Any]]
  read_unlabelled: Callable[..., list[Any]]
  label_vocab: Callable[[Sequence[Any]], list[str]] | None
  convert: Callable[..., Features]
  score: Callable[..., dict[str, float]]
  predictions: Callable[..., list[dict[str, Any]]]
  main_metric: str
  flops_per_token: Callable[[BertConfig, int], float] = encoder_flops_per_token


def _text_fields(data: ml_collections.ConfigDict) -> list[str | int]:
  fields = [f.strip() for f in data.text_fields.split(",") if f.strip()]
  return [int(f) if not data.has_header and f.isdigit() else f for f in fields]


def _label_field(data: ml_collections.ConfigDict) -> str | int:
  field = str(data.label_field)
  return int(field) if not data.has_header and field.isdigit() else field


def _jsonl(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(`file:line`, object) for each non-blank line of a JSONL file; errors name the line."""
  with open(path, encoding="utf-8-sig") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
      yield f"{path}:{number}", row


def _field(row: dict[str, Any], name: str, where: str, kind: type) -> Any:
  if not isinstance(row.get(name), kind) or not row[name]:
    raise ValueError(f"{where}: field {name!r} is missing, empty or not a {kind.__name__}")
  return row[name]


# ---------------------------------------------------------------- sequence classification

def _read_sequences(regression: bool):
  def read(data, path, label_names):
    kwargs = dict(text_fields=_text_fields(data), label_field=_label_field(data),
                  label_names=label_names, regression=regression, on_error=data.on_error)
    if data.tfds_name:
      return classification.read_tfds(data.tfds_name, path, data_dir=data.tfds_data_dir or None,
                                      **kwargs)
    return classification.read_examples(path, fmt=data.format or None,
                                        has_header=data.has_header, **kwargs)
  return read


def _read_unlabelled_sequences(data, path, label_names):
  fields = [str(f) for f in _text_fields(data)]
  placeholder = label_names[0] if label_names else 0.0  # converters need a label; unused
  examples = []
  for where, row in _jsonl(path):
    text_b = _field(row, fields[1], where, str) if len(fields) == 2 else None
    examples.append(classification.TextExample(where, _field(row, fields[0], where, str),
                                               text_b, placeholder))
  return examples


def _convert_sequences(examples, tokenizer, data, label_names):
  return classification.convert_examples(examples, tokenizer, data.max_seq_length, label_names)


def _score_sequences(split, outputs, label_names, data):
  del data
  task_type = ("regression" if label_names is None else
               "binary" if len(label_names) == 2 else "multiclass")
  return cls_metrics.compute(task_type, outputs["logits"],
                             split.features["labels"][outputs["feature_index"]])


def _predict_sequences(split, outputs, label_names, data):
  del data
  logits = outputs["logits"]  # [n, labels]
  if label_names is None:
    return [{"guid": e.guid, "score": float(s)} for e, s in zip(split.examples, logits[:, 0])]
  probs = np.asarray(jax.nn.softmax(logits, -1))
  return [{"guid": e.guid, "label": label_names[int(p.argmax())],
           "probabilities": {name: float(x) for name, x in zip(label_names, p)}}
          for e, p in zip(split.examples, probs)]


def _sequence_kind(regression: bool) -> TaskKind:
  return TaskKind(
      model=lambda config, n: BertForSequenceClassification(config, num_labels=n),
      loss=lambda model: losses.classification_loss(model, regression=regression),
      outputs=("logits",), device_fields=(*INPUTS, "labels"),
      read=_read_sequences(regression), read_unlabelled=_read_unlabelled_sequences,
      label_vocab=None if regression else classification.label_vocab,
      convert=_convert_sequences, score=_score_sequences, predictions=_predict_sequences,
      main_metric="pearson" if regression else "accuracy",
      flops_per_token=classification_flops_per_token)


# ---------------------------------------------------------------- token classification (NER)

def _read_conll(data, path, label_names):
  return ner.read_conll(path, tag_column=data.tag_column, scheme=data.tag_scheme,
                        label_names=label_names, on_error=data.on_error)


def _read_unlabelled_words(data, path, label_names):
  del data
  examples = []
  for where, row in _jsonl(path):
    words = _field(row, "tokens", where, list)
    if not all(isinstance(w, str) and w.strip() for w in words):
      raise ValueError(f"{where}: 'tokens' must be a list of non-empty strings")
    examples.append(ner.NerExample(where, tuple(words), (label_names[0],) * len(words)))
  return examples


def _convert_words(examples, tokenizer, data, label_names):
  return ner.convert_examples(examples, tokenizer, label_names, data.max_seq_length,
                              stride=None if data.stride < 0 else data.stride,
                              all_subwords=data.all_subwords)


def _tags(split, outputs, label_names):
  features = {k: v[outputs["feature_index"]] for k, v in split.features.items()}
  return ner.tags_from_predictions(split.examples, features, outputs["logits"], label_names)


def _score_words(split, outputs, label_names, data):
  del data
  predicted = _tags(split, outputs, label_names)
  return ner_metrics.compute([e.tags for e in split.examples], predicted)


def _predict_words(split, outputs, label_names, data):
  del data
  return [{"guid": e.guid, "tokens": list(e.words), "tags": tags}
          for e, tags in zip(split.examples, _tags(split, outputs, label_names))]


NER = TaskKind(
    model=lambda config, n: BertForTokenClassification(config, num_labels=n),
    loss=losses.token_classification_loss, outputs=("logits",),
    device_fields=(*INPUTS, "labels"), read=_read_conll, read_unlabelled=_read_unlabelled_words,
    label_vocab=ner.tag_vocab, convert=_convert_words, score=_score_words,
    predictions=_predict_words, main_metric="f1")


# ---------------------------------------------------------------- extractive QA

def _read_squad(data, path, label_names):
  del label_names
  return qa.read_squad(path, on_error=data.on_error)


def _read_unlabelled_questions(data, path, label_names):
  del data, label_names
  return [qa.QAExample(str(row.get("id", where)), _field(row, "question", where, str),
                       _field(row, "context", where, str), (), is_impossible=True)
          for where, row in _jsonl(path)]


def _convert_questions(examples, tokenizer, data, label_names):
  del label_names
  return qa.convert_examples(examples, tokenizer, data.max_seq_length, data.doc_stride,
                             data.max_query_length)


def _answers(split, outputs, data) -> dict[str, str]:
  features = {k: v[outputs["feature_index"]] for k, v in split.features.items()}
  return qa.postprocess(split.examples, features, outputs["start_logits"],
                        outputs["end_logits"], n_best_size=data.n_best_size,
                        max_answer_length=data.max_answer_length, version_2=data.version_2,
                        null_score_diff_threshold=data.null_score_diff_threshold)


def _score_questions(split, outputs, label_names, data):
  del label_names
  gold = [{"paragraphs": [{"qas": [
      {"id": e.qid, "answers": [{"text": a.text} for a in e.answers],
       **({"is_impossible": e.is_impossible} if data.version_2 else {})}
      for e in split.examples]}]}]
  return squad_metrics.compute(_answers(split, outputs, data), gold, version_2=data.version_2)


def _predict_questions(split, outputs, label_names, data):
  del label_names
  answers = _answers(split, outputs, data)
  return [{"id": e.qid, "answer": answers[e.qid]} for e in split.examples]


QA = TaskKind(
    model=lambda config, n: BertForQuestionAnswering(config),
    loss=losses.span_loss, outputs=("start_logits", "end_logits"),
    device_fields=(*INPUTS, "start_positions", "end_positions"), read=_read_squad,
    read_unlabelled=_read_unlabelled_questions, label_vocab=None, convert=_convert_questions,
    score=_score_questions, predictions=_predict_questions, main_metric="f1")


TASKS: dict[str, TaskKind] = {
    "classification": _sequence_kind(regression=False),
    "regression": _sequence_kind(regression=True),
    "ner": NER,
    "qa": QA,
}


# ---------------------------------------------------------------- building blocks

def num_labels(kind: str, label_names: Sequence[str] | None) -> int:
  return len(label_names) if label_names else 1 if kind == "regression" else 2


def make_task(kind: str, config: BertConfig, label_names: Sequence[str] | None,
              split: TaskSplit | None, data: ml_collections.ConfigDict) -> Task:
  """The loop's `Task` for `kind`; `split` is the eval split its `score` refers to."""
  spec = TASKS[kind]
  model = spec.model(config, num_labels(kind, label_names))
  seq = data.max_seq_length
  ids = np.zeros((1, seq), np.int32)
  batch_spec = {name: ((seq,), "int32") for name in INPUTS}
  label_shape = (seq,) if kind == "ner" else ()
  batch_spec.update({"weights": ((), "float32"), "feature_index": ((), "int32")})
  if kind == "qa":
    batch_spec.update({"start_positions": ((), "int32"), "end_positions": ((), "int32")})
  else:
    batch_spec["labels"] = (label_shape, "float32" if kind == "regression" else "int32")
  score = None if split is None else (
      lambda outputs: spec.score(split, outputs, label_names, data))
  return Task(model=model, init_inputs=(ids, ids, np.ones_like(ids)), loss_fn=spec.loss(model),
              summarize=summarize,
              flops_per_token=functools.partial(spec.flops_per_token, config),
              batch_spec=batch_spec,
              predict_fn=losses.predict_outputs(model, spec.outputs), score=score)


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Mean loss per weighted target (and token/example accuracy where the loss counts it)."""
  weight = max(sums["weight"], 1.0)
  out = {"loss": sums["loss_sum"] / weight}
  if "correct" in sums:
    out["target_accuracy"] = sums["correct"] / weight
  return out


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
                    spec.device_fields)
  return split, label_names


def load_unlabelled(kind: str, data: ml_collections.ConfigDict, path: str, tokenizer: Any,
                    label_names: Sequence[str] | None) -> TaskSplit:
  """Reads a JSONL file of inputs to predict (see README: fields per task)."""
  spec = TASKS[kind]
  examples = spec.read_unlabelled(data, path, label_names)
  if not examples:
    raise ValueError(f"{path}: no inputs")
  return TaskSplit(examples, spec.convert(examples, tokenizer, data, label_names),
                   spec.device_fields)
