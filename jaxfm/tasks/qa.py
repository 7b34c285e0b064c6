"""Extractive QA (SQuAD v1.1 / v2.0): reader, doc-stride features, span loss, answer
post-processing and scores.

Features are windows `[CLS] question [SEP] context-window [SEP]` over the context's tokens.
The fast tokenizer's offsets map every context token back to its character span in the
original context, so a predicted span is sliced from the context text itself. The head is
`models.heads.BertForQuestionAnswering`; scores are the SQuAD script's (`metrics.squad`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxfm import config as config_lib
from jaxfm.metrics import squad as squad_metrics
from jaxfm.models import BertConfig, BertForQuestionAnswering
from jaxfm.tasks.base import (RowError, RowPolicy, TaskKind, TaskSplit, encode, json_field,
                              jsonl_objects, open_text, token_ids)
from jaxfm.train.step import Batch, LossFn, Sums


@dataclasses.dataclass(frozen=True)
class Answer:
  """An answer's text and its character offset in the context."""

  text: str
  start: int


@dataclasses.dataclass(frozen=True)
class QAExample:
  """One question about one context; no answers when `is_impossible` (v2.0)."""

  qid: str
  question: str
  context: str
  answers: tuple[Answer, ...]
  is_impossible: bool = False


def _example(qa: Any, context: str) -> QAExample:
  """Parses and checks one SQuAD question entry; RowError if it is inconsistent."""
  question, impossible = qa.get("question"), qa.get("is_impossible", False)
  if not isinstance(question, str) or not question.strip():
    raise RowError(f"empty question {question!r}")
  answers = []
  for k, answer in enumerate(qa.get("answers", [])):
    text, start = answer.get("text"), answer.get("answer_start")
    if not isinstance(text, str) or not text or not isinstance(start, int):
      raise RowError(f"answer {k} is malformed: {answer!r}")
    if context[start:start + len(text)] != text:
      raise RowError(f"answer {k} {text!r} does not match the context at answer_start={start}: "
                     f"{context[start:start + len(text)]!r}")
    answers.append(Answer(text, start))
  if not answers and not impossible:
    raise RowError("no answers, and not marked is_impossible")
  return QAExample(qa["id"], question.strip(), context, tuple(answers), bool(impossible))


def read_squad(path: str, *, on_error: str = "raise") -> list[QAExample]:
  """Reads a SQuAD v1.1 or v2.0 JSON file, checking every answer against its context.

  Args:
    path: the JSON file.
    on_error: "raise" (a ValueError naming the question id) or "skip" (count and log them).
  """
  with open_text(path) as f:
    data = json.load(f)["data"]
  policy, examples, seen = RowPolicy(path, on_error), [], set()
  for article in data:
    for paragraph in article["paragraphs"]:
      context = paragraph["context"]
      for qa in paragraph["qas"]:
        with policy.at(f"{path}: question {qa.get('id')!r}"):
          if not context.strip():
            raise RowError("empty context")
          if qa.get("id") in seen:
            raise RowError("duplicate question id")
          examples.append(_example(qa, context))
          seen.add(qa["id"])
  policy.done()
  return examples


def _token_span(offsets: np.ndarray, start: int, end: int) -> tuple[int, int]:
  """First and last token overlapping characters [start, end); offsets [tokens, 2]."""
  first = int(np.searchsorted(offsets[:, 1], start, side="right"))
  last = int(np.searchsorted(offsets[:, 0], end, side="left")) - 1
  return first, last


def doc_spans(length: int, budget: int, doc_stride: int) -> list[tuple[int, int]]:
  """Token windows [start, end) of at most `budget` tokens, starts `doc_stride` apart."""
  spans, start = [], 0
  while True:
    end = min(start + budget, length)
    spans.append((start, end))
    if end == length:
      return spans
    start += min(end - start, doc_stride)


def _windows(e: int, example: QAExample, tokenizer: Any, max_seq_length: int, doc_stride: int,
             max_query_length: int) -> list[dict[str, Any]]:
  """The doc-stride windows of example number `e`: its query and context tokens, offsets,
  max-context marks and the answer's token span inside the window (None when not inside)."""
  query = tokenizer.encode(example.question, add_special_tokens=False).ids
  encoding = tokenizer.encode(example.context, add_special_tokens=False)
  offsets = np.asarray(encoding.offsets, np.int32).reshape(-1, 2)  # [tokens, 2]
  budget = max_seq_length - min(len(query), max_query_length) - 3
  if budget < 1 or doc_stride < 1:
    raise ValueError(f"max_seq_length {max_seq_length} leaves no room for the context after "
                     f"max_query_length {max_query_length}, or doc_stride < 1")
  answer = None
  if example.answers:
    first = example.answers[0]
    answer = _token_span(offsets, first.start, first.start + len(first.text))
    if answer[0] > answer[1]:
      raise ValueError(f"question {example.qid!r}: answer {first.text!r} has no tokens")
  spans = doc_spans(len(encoding.ids), budget, doc_stride)
  # A token's context in a window: min(left, right) tokens; the window's length breaks ties.
  scores = np.full((len(spans), len(encoding.ids)), -1.0)  # [windows, tokens]
  for k, (start, end) in enumerate(spans):
    position = np.arange(start, end)
    scores[k, start:end] = np.minimum(position - start, end - 1 - position) + 0.01 * (end - start)
  best = scores.argmax(0)  # [tokens]
  windows = []
  for k, (start, end) in enumerate(spans):
    inside = answer is not None and start <= answer[0] and answer[1] < end
    windows.append({"example": e, "query": query[:max_query_length],
                    "query_truncated": len(query) > max_query_length,
                    "ids": encoding.ids[start:end], "offsets": offsets[start:end],
                    "max_context": best[start:end] == k,
                    "answer": (answer[0] - start, answer[1] - start) if inside else None})
  return windows


def convert_examples(examples: Sequence[QAExample], tokenizer: Any, max_seq_length: int = 384,
                     doc_stride: int = 128, max_query_length: int = 64) -> dict[str, np.ndarray]:
  """Tokenizes examples into doc-stride windows of fixed length.

  Args:
    examples: from `read_squad`.
    tokenizer: a `tokenizers` tokenizer (no truncation or padding configured).
    max_seq_length: T.
    doc_stride: tokens between the starts of consecutive windows of one context.
    max_query_length: questions are cut to this many tokens.

  Returns:
    "input_ids", "token_type_ids", "attention_mask": int32 [N, T]; "start_positions",
    "end_positions": int32 [N], the first answer's tokens, 0 ([CLS]) when it is not wholly
    inside the window or there is none; "example_index": int32 [N]; "offsets": int32 [N, T, 2],
    each context token's character span in its context, -1 elsewhere; "max_context": bool
    [N, T], whether this window gives the token the most context of all windows (so a span
    is taken from exactly one window); "query_truncated": bool [N].
  """
  cls_id, sep_id, pad_id = token_ids(tokenizer, "[CLS]", "[SEP]", "[PAD]")
  windows = [window for e, example in enumerate(examples)  # one dict per feature
             for window in _windows(e, example, tokenizer, max_seq_length, doc_stride,
                                    max_query_length)]
  n = len(windows)
  features = {"input_ids": np.full((n, max_seq_length), pad_id, np.int32),
              "token_type_ids": np.zeros((n, max_seq_length), np.int32),
              "attention_mask": np.zeros((n, max_seq_length), np.int32),
              "start_positions": np.zeros(n, np.int32),
              "end_positions": np.zeros(n, np.int32),
              "example_index": np.zeros(n, np.int32),
              "offsets": np.full((n, max_seq_length, 2), -1, np.int32),
              "max_context": np.zeros((n, max_seq_length), bool),
              "query_truncated": np.zeros(n, bool)}
  for i, window in enumerate(windows):
    ids = [cls_id, *window["query"], sep_id, *window["ids"], sep_id]
    first = len(window["query"]) + 2  # position of the window's first context token
    last = first + len(window["ids"])
    features["input_ids"][i, :len(ids)] = ids
    features["token_type_ids"][i, first:len(ids)] = 1
    features["attention_mask"][i, :len(ids)] = 1
    features["example_index"][i] = window["example"]
    features["offsets"][i, first:last] = window["offsets"]
    features["max_context"][i, first:last] = window["max_context"]
    features["query_truncated"][i] = window["query_truncated"]
    if window["answer"] is not None:
      features["start_positions"][i] = window["answer"][0] + first
      features["end_positions"][i] = window["answer"][1] + first
  return features


def postprocess(examples: Sequence[QAExample], features: dict[str, np.ndarray],
                start_logits: np.ndarray, end_logits: np.ndarray, *, n_best_size: int = 20,
                max_answer_length: int = 30, version_2: bool = False,
                null_score_diff_threshold: float = 0.0) -> dict[str, str]:
  """The best answer text per question from span logits over all its windows.

  In each window the top `n_best_size` start and end positions among context tokens are
  paired; a span is valid if end >= start, it is at most `max_answer_length` tokens, and its
  start token has its max context in this window. The best valid span over all windows wins,
  its text sliced from the original context. With `version_2`, the answer is "" when the null
  score (the lowest [CLS] start + end over the windows) beats the best span by more than
  `null_score_diff_threshold`.

  Args:
    examples: the questions the features were made from.
    features: from `convert_examples`.
    start_logits, end_logits: [N, T].

  Returns:
    question id -> answer text ("" for no answer).
  """
  start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
  best: list[tuple[float, str] | None] = [None] * len(examples)
  null = np.full(len(examples), np.inf)
  for i, e in enumerate(features["example_index"]):
    null[e] = min(null[e], start_logits[i, 0] + end_logits[i, 0])
    offsets = features["offsets"][i]
    context = np.flatnonzero(offsets[:, 0] >= 0)
    starts = context[np.argsort(-start_logits[i, context], kind="stable")[:n_best_size]]
    ends = context[np.argsort(-end_logits[i, context], kind="stable")[:n_best_size]]
    starts = starts[features["max_context"][i, starts]]
    valid = (ends >= starts[:, None]) & (ends - starts[:, None] < max_answer_length)
    if not valid.any():
      continue
    scores = np.where(valid, start_logits[i, starts, None] + end_logits[i, ends], -np.inf)
    s, t = np.unravel_index(np.argmax(scores), scores.shape)  # [starts, ends]
    if best[e] is None or scores[s, t] > best[e][0]:
      text = examples[e].context[offsets[starts[s], 0]:offsets[ends[t], 1]]
      best[e] = (float(scores[s, t]), text)
  predictions = {}
  for e, example in enumerate(examples):
    no_answer = best[e] is None or (version_2 and
                                    null[e] - best[e][0] > null_score_diff_threshold)
    predictions[example.qid] = "" if no_answer else best[e][1]
  return predictions


# ---------------------------------------------------------------- the task kind

def validate_data(cfg: ml_collections.ConfigDict) -> None:
  """Window, query and answer sizes are positive, and a window leaves room for context."""
  d = cfg.data
  config_lib.positive(cfg, "data.doc_stride", "data.max_query_length", "data.max_answer_length",
                      "data.n_best_size")
  if d.max_query_length + 4 > d.max_seq_length:
    raise config_lib.ConfigError(f"data.max_query_length={d.max_query_length} leaves no room "
                                 f"for the context in data.max_seq_length={d.max_seq_length}")


def loss(model: nn.Module) -> LossFn:
  """Mean of the start and end cross-entropies over the sequence.

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; start_positions,
  end_positions int32 [b] (0 = [CLS] when the window holds no answer); weights float32 [b].
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    start_logits, end_logits = encode(model, params, batch, rng)  # [b, t] each
    weights = batch["weights"]
    nll = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(start_logits, batch["start_positions"])
        + optax.softmax_cross_entropy_with_integer_labels(end_logits, batch["end_positions"]))
    loss_sum = jnp.sum(nll * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights)}
  return loss_fn


def _read(data: ml_collections.ConfigDict, path: str,
          label_names: Sequence[str] | None) -> list[QAExample]:
  del label_names
  return read_squad(path, on_error=data.on_error)


def read_unlabelled(data: ml_collections.ConfigDict, path: str,
                    label_names: Sequence[str] | None) -> list[QAExample]:
  """JSONL rows with "question", "context" and optionally "id"."""
  del data, label_names
  return [QAExample(str(row.get("id", where)), json_field(row, "question", where, str),
                    json_field(row, "context", where, str), (), is_impossible=True)
          for where, row in jsonl_objects(path)]


def _convert(examples: Sequence[QAExample], tokenizer: Any, data: ml_collections.ConfigDict,
             label_names: Sequence[str] | None) -> dict[str, np.ndarray]:
  del label_names
  return convert_examples(examples, tokenizer, data.max_seq_length, data.doc_stride,
                          data.max_query_length)


def _answers(split: TaskSplit, outputs: dict[str, np.ndarray],
             data: ml_collections.ConfigDict) -> dict[str, str]:
  features = {k: v[outputs["feature_index"]] for k, v in split.features.items()}
  return postprocess(split.examples, features, outputs["start_logits"], outputs["end_logits"],
                     n_best_size=data.n_best_size, max_answer_length=data.max_answer_length,
                     version_2=data.version_2,
                     null_score_diff_threshold=data.null_score_diff_threshold)


def score(split: TaskSplit, outputs: dict[str, np.ndarray], label_names: Sequence[str] | None,
          data: ml_collections.ConfigDict) -> dict[str, float]:
  """Exact match and F1 (with the v2.0 has-answer / no-answer parts when `version_2`)."""
  del label_names
  gold = [{"paragraphs": [{"qas": [
      {"id": e.qid, "answers": [{"text": a.text} for a in e.answers],
       **({"is_impossible": e.is_impossible} if data.version_2 else {})}
      for e in split.examples]}]}]
  return squad_metrics.compute(_answers(split, outputs, data), gold, version_2=data.version_2)


def predictions(split: TaskSplit, outputs: dict[str, np.ndarray],
                label_names: Sequence[str] | None,
                data: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Per question: its id and the answer text ("" for no answer)."""
  del label_names
  answers = _answers(split, outputs, data)
  return [{"id": e.qid, "answer": answers[e.qid]} for e in split.examples]


def _model(config: BertConfig, label_names: Sequence[str] | None) -> nn.Module:
  del label_names
  return BertForQuestionAnswering(config)


QA = TaskKind(
    model=_model, loss=loss, outputs=("start_logits", "end_logits"),
    labels=lambda seq_len: {"start_positions": ((), "int32"), "end_positions": ((), "int32")},
    validate=validate_data, read=_read, read_unlabelled=read_unlabelled, label_vocab=None,
    convert=_convert, score=score, predictions=predictions, main_metric="f1")
