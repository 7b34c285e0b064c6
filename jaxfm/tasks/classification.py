"""Sentence and sentence-pair classification, and regression: readers, features, loss, scores.

Files: GLUE-style TSV (with or without a header; quotes are not special), CSV, or JSONL, or a
tfds dataset by name. Fields are header names / JSON keys, or 0-based column indices for files
without a header. Labels stay strings (class names) or become floats (regression); class
names map to ids through a label vocabulary taken from the training split. The head is
`models.heads.BertForSequenceClassification` (pooler + linear layer; one output for regression).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from jaxfm import config as config_lib
from jaxfm.metrics import classification as cls_metrics
from jaxfm.models import BertConfig, BertForSequenceClassification
from jaxfm.tasks.base import (PACKED_SLOT_INPUTS, PACKED_TOKEN_INPUTS, RowError, RowPolicy,
                              TaskKind, TaskSplit, encode, json_field, jsonl_objects, open_text,
                              token_ids)
from jaxfm.train.flops import classification_flops_per_token
from jaxfm.train.step import Batch, LossFn, Sums

Field = str | int
PACKED_INPUTS = PACKED_TOKEN_INPUTS + PACKED_SLOT_INPUTS  # the model reads each example's [CLS]
FORMATS = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}


@dataclasses.dataclass(frozen=True)
class TextExample:
  """One sentence or sentence pair; `guid` says where it came from (`file:line`)."""

  guid: str
  text_a: str
  text_b: str | None
  label: str | float


def _parse(values: dict[Field, Any], text_fields: Sequence[Field], label_field: Field,
           label_names: Sequence[str] | None, regression: bool) -> tuple[Any, ...]:
  """(text_a, text_b, label) of one record's field values; RowError if they are bad."""
  texts = []
  for field in text_fields:
    text = values[field]
    if not isinstance(text, str) or not text.strip():
      raise RowError(f"empty or non-text {field!r}: {text!r}")
    texts.append(text.strip())
  raw = values[label_field]
  if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
    raise RowError(f"bad label {raw!r}")
  if regression:
    try:
      label = float(raw)
    except ValueError:
      raise RowError(f"label {raw!r} is not a number") from None
    if not math.isfinite(label):
      raise RowError(f"label {raw!r} is not finite")
  else:
    label = str(raw).strip()
    if not label:
      raise RowError("empty label")
    if label_names is not None and label not in label_names:
      raise RowError(f"unknown label {label!r}; the label vocabulary is {list(label_names)}")
  return texts[0], texts[1] if len(texts) == 2 else None, label


Decoder = Callable[[Any], dict[Field, Any]]  # raw row -> {field: value}, or RowError


def _table_rows(path: str, fmt: str) -> Iterator[tuple[int, list[str]]]:
  """(line number, cells) of the non-blank rows of a TSV or CSV file."""
  with open_text(path, newline="") as f:
    if fmt == "csv":
      reader = csv.reader(f)
      for cells in reader:
        if cells:
          yield reader.line_num, cells
    else:
      for line_number, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if line:
          yield line_number, line.split("\t")


def _table(path: str, fmt: str, fields: Sequence[Field],
           has_header: bool) -> tuple[Iterator[tuple[int, list[str]]], Decoder]:
  """The data rows of a TSV/CSV file and their decoder (the first row fixes the column count)."""
  rows = _table_rows(path, fmt)
  first = next(rows, None)
  if first is None:  # an empty file: no rows to decode
    return iter(()), dict
  columns = len(first[1])
  if has_header:
    header = {name.strip(): index for index, name in enumerate(first[1])}
    if missing := [f for f in fields if isinstance(f, str) and f not in header]:
      raise ValueError(f"{path}:{first[0]}: no column {missing} in the header {list(header)}")
    indices = {f: header[f] if isinstance(f, str) else f for f in fields}
  else:
    if names := [f for f in fields if isinstance(f, str)]:
      raise ValueError(f"{path}: fields {names} are names, but has_header=False: use indices")
    indices = {f: f for f in fields}
    rows = itertools.chain([first], rows)
  if bad := [f for f, i in indices.items() if not -columns <= i < columns]:
    raise ValueError(f"{path}:{first[0]}: columns {bad} out of range for {columns} columns")

  def decode(cells: list[str]) -> dict[Field, Any]:
    if len(cells) != columns:
      raise RowError(f"{len(cells)} columns, expected {columns}")
    return {field: cells[index] for field, index in indices.items()}

  return rows, decode


def _jsonl(path: str, fields: Sequence[Field]) -> tuple[Iterator[tuple[int, str]], Decoder]:
  """The non-blank lines of a JSONL file and their decoder."""
  if indices := [f for f in fields if not isinstance(f, str)]:
    raise ValueError(f"{path}: JSONL fields must be key names, got {indices}")

  def lines() -> Iterator[tuple[int, str]]:
    with open_text(path) as f:
      yield from ((n, line) for n, line in enumerate(f, 1) if line.strip())

  def decode(line: str) -> dict[Field, Any]:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as error:
      raise RowError(f"not JSON: {error}") from None
    if not isinstance(record, dict):
      raise RowError("not a JSON object")
    if missing := [f for f in fields if f not in record]:
      raise RowError(f"no field {missing} (has {sorted(record)})")
    return {field: record[field] for field in fields}

  return lines(), decode


def _check_fields(text_fields: Sequence[Field]) -> None:
  if isinstance(text_fields, (str, int)) or len(text_fields) not in (1, 2):
    raise ValueError(f"text_fields must list one or two fields, got {text_fields!r}")


def read_examples(path: str, *, text_fields: Sequence[Field] = ("sentence",),
                  label_field: Field = "label", fmt: str | None = None, has_header: bool = True,
                  label_names: Sequence[str] | None = None, regression: bool = False,
                  on_error: str = "raise") -> list[TextExample]:
  """Reads a TSV, CSV or JSONL file of labelled sentences or sentence pairs.

  Args:
    path: the file; a UTF-8 BOM is tolerated, blank lines are ignored.
    text_fields: one field (single sentence) or two (pair).
    label_field: the label's field.
    fmt: "tsv", "csv" or "jsonl"; None infers it from the file extension.
    has_header: TSV/CSV only: the first row names the columns.
    label_names: when given, any other label is a bad row (use the training split's vocabulary
      when reading dev data).
    regression: labels are floats.
    on_error: "raise" (a ValueError naming `file:line`) or "skip" (count and log bad rows).

  Returns:
    The examples in file order, each with `guid` = `path:line`.
  """
  _check_fields(text_fields)
  fmt = fmt or FORMATS.get(os.path.splitext(path)[1].lower())
  if fmt not in FORMATS.values():
    raise ValueError(f"{path}: unknown format {fmt!r}; pass fmt= one of {set(FORMATS.values())}")
  fields = [*text_fields, label_field]
  rows, decode = _jsonl(path, fields) if fmt == "jsonl" else _table(path, fmt, fields, has_header)
  policy, examples = RowPolicy(path, on_error), []
  for line_number, row in rows:
    with policy.at(f"{path}:{line_number}"):
      examples.append(TextExample(f"{path}:{line_number}", *_parse(
          decode(row), text_fields, label_field, label_names, regression)))
  policy.done()
  return examples


def _plain(value: Any) -> Any:
  """A tfds feature value as a Python str / number."""
  value = value.item() if isinstance(value, np.generic) else value
  return value.decode("utf-8") if isinstance(value, bytes) else value


def read_tfds(name: str, split: str, *, text_fields: Sequence[Field] = ("sentence",),
              label_field: Field = "label", data_dir: str | None = None,
              label_names: Sequence[str] | None = None, regression: bool = False,
              on_error: str = "raise") -> list[TextExample]:
  """Reads a prepared tfds dataset (e.g. "glue/sst2") through `tfds.data_source`.

  Class labels become their decimal strings ("0", "1", ...); `guid` is `name/split:index`.
  The other arguments are as in `read_examples`.
  """
  _check_fields(text_fields)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    raise ImportError(f"reading {name!r} needs tensorflow-datasets "
                      f"(pip install tensorflow-datasets): {error}") from error
  source = tfds.data_source(name, split=split, data_dir=data_dir)
  fields = [*text_fields, label_field]
  policy, examples = RowPolicy(f"{name}/{split}", on_error), []
  for index in range(len(source)):
    record = source[index]
    with policy.at(f"{name}/{split}:{index}"):
      if missing := [f for f in fields if f not in record]:
        raise RowError(f"no feature {missing} (has {sorted(record)})")
      values = {field: _plain(record[field]) for field in fields}
      examples.append(TextExample(f"{name}/{split}:{index}", *_parse(
          values, text_fields, label_field, label_names, regression)))
  policy.done()
  return examples


def label_vocab(examples: Iterable[TextExample]) -> list[str]:
  """The sorted distinct labels (numerically when they are all integers, so "2" < "10")."""
  names = {example.label for example in examples}
  if not all(isinstance(name, str) for name in names):
    raise ValueError("label_vocab needs class labels, not regression floats")
  try:
    return sorted(names, key=int)
  except ValueError:
    return sorted(names)


def truncated_lengths(len_a: int, len_b: int, budget: int) -> tuple[int, int]:
  """Lengths after longest-first truncation of a pair to `budget` tokens.

  As `tokenizers`' "longest_first": the shorter side stays whole if it fits in half the
  budget, else each side gets half and an odd token goes to the longer side (b on a tie).
  """
  if len_a + len_b <= budget:
    return len_a, len_b
  if min(len_a, len_b) * 2 <= budget:
    return (budget - len_b, len_b) if len_a > len_b else (len_a, budget - len_a)
  half = budget // 2
  return (budget - half, half) if len_a > len_b else (half, budget - half)


def convert_examples(examples: Sequence[TextExample], tokenizer: Any, max_seq_length: int,
                     label_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Tokenizes examples into fixed-shape arrays: `[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]`.

  Args:
    examples: from a reader.
    tokenizer: a `tokenizers` tokenizer (no truncation or padding configured).
    max_seq_length: T; longer inputs are truncated longest-first.
    label_names: the label vocabulary; None for regression (float labels).

  Returns:
    "input_ids", "token_type_ids", "attention_mask": int32 [N, T]; "labels": int32 [N] (class
    index) or float32 [N] (regression); "truncated": bool [N].
  """
  if max_seq_length < 4:
    raise ValueError(f"max_seq_length must be at least 4, got {max_seq_length}")
  cls_id, sep_id, pad_id = token_ids(tokenizer, "[CLS]", "[SEP]", "[PAD]")
  label_index = None if label_names is None else {name: i for i, name in enumerate(label_names)}
  n = len(examples)
  features = {"input_ids": np.full((n, max_seq_length), pad_id, np.int32),
              "token_type_ids": np.zeros((n, max_seq_length), np.int32),
              "attention_mask": np.zeros((n, max_seq_length), np.int32),
              "labels": np.zeros(n, np.float32 if label_index is None else np.int32),
              "truncated": np.zeros(n, bool)}
  for i, example in enumerate(examples):
    if (label_index is None) != isinstance(example.label, float):
      raise ValueError(f"{example.guid}: label {example.label!r} does not fit label_names="
                       f"{label_names!r} (None means regression)")
    if label_index is not None and example.label not in label_index:
      raise ValueError(f"{example.guid}: unknown label {example.label!r}")
    a = tokenizer.encode(example.text_a, add_special_tokens=False).ids
    b = [] if example.text_b is None else tokenizer.encode(example.text_b,
                                                           add_special_tokens=False).ids
    budget = max_seq_length - (2 if example.text_b is None else 3)
    len_a, len_b = truncated_lengths(len(a), len(b), budget)
    ids = [cls_id, *a[:len_a], sep_id]
    if example.text_b is not None:
      ids += [*b[:len_b], sep_id]
    features["input_ids"][i, :len(ids)] = ids
    features["token_type_ids"][i, len_a + 2:len(ids)] = 1
    features["attention_mask"][i, :len(ids)] = 1
    features["labels"][i] = example.label if label_index is None else label_index[example.label]
    features["truncated"][i] = len_a + len_b < len(a) + len(b)
  if truncated := int(features["truncated"].sum()):
    logging.info("truncated %d of %d examples to %d tokens", truncated, n, max_seq_length)
  return features


# ---------------------------------------------------------------- the task kind

def validate_data(cfg: ml_collections.ConfigDict) -> None:
  """The text fields name one sentence or a pair."""
  if len([f for f in cfg.data.text_fields.split(",") if f]) not in (1, 2):
    config_lib.fail("data.text_fields", cfg.data.text_fields,
                    "must name one field or two (comma-separated)")


def loss(model: nn.Module, regression: bool = False) -> LossFn:
  """Cross-entropy over classes, or squared error when `regression` (one output).

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; labels int32 [b] (float32
  for regression); weights float32 [b] (0 = padding example). Packed rows (`data.packing`)
  hold one example per slot: labels, weights and cls_positions [b, slots], segment_ids and
  position_ids [b, t].
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    logits = encode(model, params, batch, rng, PACKED_INPUTS)  # [b, (slots,) classes]
    weights = batch["weights"]  # [b (, slots)]
    if regression:
      per_example = jnp.square(logits[..., 0] - batch["labels"])  # [b (, slots)]
      sums = {}
    else:
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      sums = {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights)}
    loss_sum = jnp.sum(per_example * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), **sums}
  return loss_fn


def _fields(data: ml_collections.ConfigDict) -> tuple[list[Field], Field]:
  """The text fields and the label field; digits are column indices in files without a header."""
  def field(name: str) -> Field:
    return int(name) if not data.has_header and name.isdigit() else name
  texts = [field(f.strip()) for f in data.text_fields.split(",") if f.strip()]
  return texts, field(str(data.label_field))


def _reader(regression: bool) -> Callable[..., list[TextExample]]:
  def read(data: ml_collections.ConfigDict, path: str,
           label_names: Sequence[str] | None) -> list[TextExample]:
    text_fields, label_field = _fields(data)
    kwargs = dict(text_fields=text_fields, label_field=label_field, label_names=label_names,
                  regression=regression, on_error=data.on_error)
    if data.tfds_name:
      return read_tfds(data.tfds_name, path, data_dir=data.tfds_data_dir or None, **kwargs)
    return read_examples(path, fmt=data.format or None, has_header=data.has_header, **kwargs)
  return read


def read_unlabelled(data: ml_collections.ConfigDict, path: str,
                    label_names: Sequence[str] | None) -> list[TextExample]:
  """JSONL rows holding the text fields (by name)."""
  fields = [str(f) for f in _fields(data)[0]]
  placeholder = label_names[0] if label_names else 0.0  # converters need a label; unused
  examples = []
  for where, row in jsonl_objects(path):
    text_b = json_field(row, fields[1], where, str) if len(fields) == 2 else None
    examples.append(TextExample(where, json_field(row, fields[0], where, str), text_b,
                                placeholder))
  return examples


def _convert(examples: Sequence[TextExample], tokenizer: Any, data: ml_collections.ConfigDict,
             label_names: Sequence[str] | None) -> dict[str, np.ndarray]:
  return convert_examples(examples, tokenizer, data.max_seq_length, label_names)


def score(split: TaskSplit, outputs: dict[str, np.ndarray], label_names: Sequence[str] | None,
          data: ml_collections.ConfigDict) -> dict[str, float]:
  """Accuracy and F1 (binary), macro F1 (multiclass), or Pearson/Spearman (regression)."""
  del data
  task_type = ("regression" if label_names is None else
               "binary" if len(label_names) == 2 else "multiclass")
  return cls_metrics.compute(task_type, outputs["logits"],
                             split.features["labels"][outputs["feature_index"]])


def predictions(split: TaskSplit, outputs: dict[str, np.ndarray],
                label_names: Sequence[str] | None,
                data: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Per example: the score (regression), or the label and every label's probability."""
  del data
  logits = outputs["logits"]  # [n, labels]
  if label_names is None:
    return [{"guid": e.guid, "score": float(s)} for e, s in zip(split.examples, logits[:, 0])]
  probs = np.asarray(jax.nn.softmax(logits, -1))  # [n, labels]
  return [{"guid": e.guid, "label": label_names[int(p.argmax())],
           "probabilities": {name: float(x) for name, x in zip(label_names, p)}}
          for e, p in zip(split.examples, probs)]


def _kind(regression: bool) -> TaskKind:
  def model(config: BertConfig, label_names: Sequence[str] | None) -> nn.Module:
    count = 1 if regression else len(label_names) if label_names else 2
    return BertForSequenceClassification(config, num_labels=count)

  label_dtype = "float32" if regression else "int32"
  return TaskKind(
      model=model, loss=lambda m: loss(m, regression=regression), outputs=("logits",),
      labels=lambda seq_len: {"labels": ((), label_dtype)}, validate=validate_data,
      read=_reader(regression), read_unlabelled=read_unlabelled,
      label_vocab=None if regression else label_vocab, convert=_convert, score=score,
      predictions=predictions,
      main_metric="pearson" if regression else "accuracy", reads_tfds=True,
      flops_per_token=classification_flops_per_token, packs="examples")


CLASSIFICATION = _kind(regression=False)
REGRESSION = _kind(regression=True)
