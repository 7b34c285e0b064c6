"""Token classification (NER): CoNLL reader, tag schemes, sub-word windows and back, loss, scores.

Each word's label sits on its first sub-word (the others get IGNORE, or with
`all_subwords=True` the word's label with B- turned into I-). A sentence longer than one
window is split into windows of whole words that overlap by up to `stride` tokens; every word
is labelled in exactly one window, the one giving it the most context on both sides. The head
is `models.heads.BertForTokenClassification`; scores are seqeval's entity F1 (`metrics.ner`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxfm import config as config_lib
from jaxfm.metrics import ner as ner_metrics
from jaxfm.models import BertConfig, BertForTokenClassification
from jaxfm.tasks.base import (RowError, RowPolicy, TaskKind, TaskSplit, encode, json_field,
                              jsonl_objects, open_text, token_ids, token_weights)
from jaxfm.train.step import Batch, LossFn, Sums

IGNORE = -100  # label of positions that carry no loss
SCHEMES = {"iob2": "BIO", "iob1": "BIO", "bioes": "BIOES"}  # scheme -> allowed tag prefixes


@dataclasses.dataclass(frozen=True)
class NerExample:
  """One sentence; `guid` is `file:line` of its first token; tags are IOB2."""

  guid: str
  words: tuple[str, ...]
  tags: tuple[str, ...]


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
  """Rewrites valid IOB1 or BIOES tags as IOB2.

  IOB1 begins an entity with I- unless it follows one of the same type, so an I- after O or
  after another type becomes B-. BIOES: S- becomes B-, E- becomes I-.
  """
  if scheme == "iob2":
    return list(tags)
  if scheme == "bioes":
    return [{"S": "B", "E": "I"}.get(tag[0], tag[0]) + tag[1:] for tag in tags]
  if scheme != "iob1":
    raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
  out = []
  for i, tag in enumerate(tags):
    starts = tag.startswith("I-") and (i == 0 or tags[i - 1][2:] != tag[2:])
    out.append("B" + tag[1:] if starts else tag)
  return out


def _check_tag(tag: str, scheme: str, where: str) -> None:
  """Raises a RowError at `where` unless `tag` is O or an allowed prefix of `scheme` + type."""
  prefixes = SCHEMES[scheme].replace("O", "")
  if not (tag == "O" or (len(tag) > 2 and tag[0] in prefixes and tag[1] == "-")):
    raise RowError(f"tag {tag!r} is not O or {'/'.join(prefixes)}- plus a type ({scheme})",
                   where)


def read_conll(path: str, *, tag_column: int = -1, scheme: str = "iob2",
               label_names: Sequence[str] | None = None,
               on_error: str = "raise") -> list[NerExample]:
  """Reads a CoNLL file: `WORD ... TAG` per line, blank lines between sentences.

  `-DOCSTART-` lines are skipped. Columns are separated by spaces or tabs; the first token
  line fixes the column count.

  Args:
    path: the file (UTF-8).
    tag_column: the tag's column (default the last); the word is column 0.
    scheme: the file's tag scheme, "iob2", "iob1" or "bioes"; tags come back as IOB2.
    label_names: when given, any other (IOB2) tag is an error.
    on_error: "raise" (a ValueError naming `file:line`) or "skip" (drop the whole sentence,
      count and log it).

  Returns:
    The sentences in file order.
  """
  if scheme not in SCHEMES:
    raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {scheme!r}")
  sentences: list[list[tuple[int, list[str]]]] = [[]]  # [(line number, columns)] each
  with open_text(path) as f:
    for line_number, line in enumerate(f, 1):
      columns = re.split(r"[ \t]+", line.strip(" \t\r\n"))
      if columns == [""] or columns[0] == "-DOCSTART-":
        if sentences[-1]:
          sentences.append([])
      else:
        sentences[-1].append((line_number, columns))
  width = len(sentences[0][0][1]) if sentences[0] else 0
  if width and not (-width <= tag_column < width and tag_column % width):
    raise ValueError(f"{path}:{sentences[0][0][0]}: tag_column {tag_column} does not fit "
                     f"{width} columns (the word is column 0)")
  policy, examples = RowPolicy(path, on_error), []
  for sentence in filter(None, sentences):
    with policy.at(f"{path}:{sentence[0][0]}"):
      for line_number, columns in sentence:
        where = f"{path}:{line_number}"
        if len(columns) != width:
          raise RowError(f"{len(columns)} columns, expected {width}", where)
        _check_tag(columns[tag_column], scheme, where)
      tags = to_iob2([columns[tag_column] for _, columns in sentence], scheme)
      if label_names is not None:
        for (line_number, _), tag in zip(sentence, tags):
          if tag not in label_names:
            raise RowError(f"unknown tag {tag!r}; the label vocabulary is {list(label_names)}",
                           f"{path}:{line_number}")
      examples.append(NerExample(f"{path}:{sentence[0][0]}",
                                 tuple(columns[0] for _, columns in sentence), tuple(tags)))
  policy.done()
  return examples


def tag_vocab(examples: Iterable[NerExample]) -> list[str]:
  """The sorted distinct tags."""
  return sorted({tag for example in examples for tag in example.tags})


def _word_pieces(words: Sequence[str], tokenizer: Any, unk_id: int,
                 budget: int) -> list[list[int]]:
  """Sub-word ids per word; [UNK] for a word with none, at most `budget` per word."""
  encoding = tokenizer.encode(list(words), is_pretokenized=True, add_special_tokens=False)
  pieces: list[list[int]] = [[] for _ in words]
  for token_id, word in zip(encoding.ids, encoding.word_ids):
    pieces[word].append(token_id)
  return [word_pieces[:budget] or [unk_id] for word_pieces in pieces]


def windows(counts: Sequence[int], budget: int, stride: int) -> list[tuple[int, int]]:
  """Word ranges [start, end) of at most `budget` tokens that cover every word.

  Each window is as long as fits; the next one starts at the first word from which the tokens
  up to the previous end fit in `stride` (and still leave room for one new word).

  Args:
    counts: sub-word count of each word (each at most `budget`).
    budget: tokens per window.
    stride: most tokens shared by consecutive windows.
  """
  ends = np.concatenate([[0], np.cumsum(counts)])  # ends[w]: tokens before word w
  spans, start = [], 0
  while True:
    end = max(start + 1, int(np.searchsorted(ends, ends[start] + budget, side="right")) - 1)
    spans.append((start, end))
    if end >= len(counts):
      return spans
    overlap = min(stride, budget - counts[end])
    start = max(start + 1, int(np.searchsorted(ends, ends[end] - overlap, side="left")))


def _owners(counts: Sequence[int], spans: Sequence[tuple[int, int]]) -> np.ndarray:
  """The window labelling each word: most min(left, right) context tokens, earliest on a tie."""
  ends = np.concatenate([[0], np.cumsum(counts)])
  best = np.full(len(counts), -1)
  owner = np.zeros(len(counts), int)
  for k, (start, end) in enumerate(spans):
    words = np.arange(start, end)
    context = np.minimum(ends[words] - ends[start], ends[end] - ends[words + 1])
    better = context > best[words]
    best[words[better]], owner[words[better]] = context[better], k
  return owner


def convert_examples(examples: Sequence[NerExample], tokenizer: Any,
                     label_names: Sequence[str], max_seq_length: int, stride: int | None = None,
                     all_subwords: bool = False) -> dict[str, np.ndarray]:
  """Tokenizes sentences into fixed-shape windows `[CLS] pieces [SEP]`.

  Args:
    examples: from `read_conll`.
    tokenizer: a `tokenizers` tokenizer (no truncation or padding configured).
    label_names: the tag vocabulary; label ids index it.
    max_seq_length: T.
    stride: most tokens that consecutive windows of one long sentence share (as context);
      None: a quarter of the window.
    all_subwords: label every sub-word (continuations get I- for B-) instead of the first.

  Returns:
    "input_ids", "token_type_ids", "attention_mask", "labels" (IGNORE where no loss):
    int32 [N, T]; "example_index": int32 [N]; "word_index": int32 [N, T], the word whose label
    a position carries for `tags_from_predictions` (its first sub-word in the window that
    labels it), else -1. N >= number of sentences.
  """
  budget = max_seq_length - 2
  stride = budget // 4 if stride is None else stride
  if not 0 <= stride < budget:
    raise ValueError(f"stride must be in [0, {budget}) for max_seq_length {max_seq_length}")
  cls_id, sep_id, pad_id, unk_id = token_ids(tokenizer, "[CLS]", "[SEP]", "[PAD]", "[UNK]")
  label_index = {name: i for i, name in enumerate(label_names)}
  continuation = {name: label_index.get("I" + name[1:], i) if name.startswith("B-") else i
                  for i, name in enumerate(label_names)}
  rows = []  # (example index, ids, labels, word index)
  for e, example in enumerate(examples):
    if unknown := set(example.tags) - set(label_index):
      raise ValueError(f"{example.guid}: tags {sorted(unknown)} not in label_names")
    pieces = _word_pieces(example.words, tokenizer, unk_id, budget)
    counts = [len(p) for p in pieces]
    spans = windows(counts, budget, stride)
    owner = _owners(counts, spans)
    for k, (start, end) in enumerate(spans):
      ids, labels, word_index = [cls_id], [IGNORE], [-1]
      for w in range(start, end):
        ids += pieces[w]
        label = label_index[example.tags[w]] if owner[w] == k else IGNORE
        rest = continuation[example.tags[w]] if all_subwords and label != IGNORE else IGNORE
        labels += [label] + [rest] * (counts[w] - 1)
        word_index += [w if owner[w] == k else -1] + [-1] * (counts[w] - 1)
      rows.append((e, ids + [sep_id], labels + [IGNORE], word_index + [-1]))
  n = len(rows)
  features = {"input_ids": np.full((n, max_seq_length), pad_id, np.int32),
              "token_type_ids": np.zeros((n, max_seq_length), np.int32),
              "attention_mask": np.zeros((n, max_seq_length), np.int32),
              "labels": np.full((n, max_seq_length), IGNORE, np.int32),
              "example_index": np.zeros(n, np.int32),
              "word_index": np.full((n, max_seq_length), -1, np.int32)}
  for i, (e, ids, labels, word_index) in enumerate(rows):
    features["input_ids"][i, :len(ids)] = ids
    features["attention_mask"][i, :len(ids)] = 1
    features["labels"][i, :len(ids)] = labels
    features["example_index"][i] = e
    features["word_index"][i, :len(ids)] = word_index
  return features


def tags_from_predictions(examples: Sequence[NerExample], features: dict[str, np.ndarray],
                          predictions: np.ndarray, label_names: Sequence[str]) -> list[list[str]]:
  """Word-level tags per sentence from per-position predictions over all windows.

  Args:
    examples: the sentences the features were made from.
    features: from `convert_examples`.
    predictions: [N, T] label ids, or [N, T, labels] logits.
    label_names: the tag vocabulary.
  """
  predictions = np.asarray(predictions)
  if predictions.ndim == 3:
    predictions = predictions.argmax(-1)
  tags: list[list[str | None]] = [[None] * len(example.words) for example in examples]
  rows, positions = np.nonzero(features["word_index"] >= 0)
  for row, position in zip(rows, positions):
    word = features["word_index"][row, position]
    tags[features["example_index"][row]][word] = label_names[predictions[row, position]]
  for example, sentence in zip(examples, tags):
    if None in sentence:
      raise ValueError(f"{example.guid}: features do not label every word; were they made from "
                       "these examples?")
  return tags


# ---------------------------------------------------------------- the task kind

def validate_data(cfg: ml_collections.ConfigDict) -> None:
  """The file's tag scheme is one the reader knows."""
  config_lib.one_of(cfg, "data.tag_scheme", tuple(SCHEMES))


def loss(model: nn.Module) -> LossFn:
  """Cross-entropy per labelled token; label IGNORE marks positions without a loss.

  Batch: input_ids, token_type_ids, attention_mask, labels int32 [b, t]; weights float32 [b],
  or in packed rows (`data.packing`) [b, slots] with segment_ids and position_ids [b, t].
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    logits = encode(model, params, batch, rng)  # [b, t, labels]
    labels = batch["labels"]
    weights = (labels >= 0) * token_weights(batch)  # [b, t]
    safe = jnp.maximum(labels, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)  # [b, t]
    loss_sum = jnp.sum(nll * weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == safe) * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": correct}
  return loss_fn


def _read(data: ml_collections.ConfigDict, path: str,
          label_names: Sequence[str] | None) -> list[NerExample]:
  return read_conll(path, tag_column=data.tag_column, scheme=data.tag_scheme,
                    label_names=label_names, on_error=data.on_error)


def read_unlabelled(data: ml_collections.ConfigDict, path: str,
                    label_names: Sequence[str]) -> list[NerExample]:
  """JSONL rows with "tokens": a list of words."""
  del data
  examples = []
  for where, row in jsonl_objects(path):
    words = json_field(row, "tokens", where, list)
    if not all(isinstance(w, str) and w.strip() for w in words):
      raise ValueError(f"{where}: 'tokens' must be a list of non-empty strings")
    examples.append(NerExample(where, tuple(words), (label_names[0],) * len(words)))
  return examples


def _convert(examples: Sequence[NerExample], tokenizer: Any, data: ml_collections.ConfigDict,
             label_names: Sequence[str]) -> dict[str, np.ndarray]:
  return convert_examples(examples, tokenizer, label_names, data.max_seq_length,
                          stride=None if data.stride < 0 else data.stride,
                          all_subwords=data.all_subwords)


def _tags(split: TaskSplit, outputs: dict[str, np.ndarray],
          label_names: Sequence[str]) -> list[list[str]]:
  features = {k: v[outputs["feature_index"]] for k, v in split.features.items()}
  return tags_from_predictions(split.examples, features, outputs["logits"], label_names)


def score(split: TaskSplit, outputs: dict[str, np.ndarray], label_names: Sequence[str],
          data: ml_collections.ConfigDict) -> dict[str, float]:
  """Entity precision, recall and F1 over the split's sentences."""
  del data
  predicted = _tags(split, outputs, label_names)
  return ner_metrics.compute([e.tags for e in split.examples], predicted)


def predictions(split: TaskSplit, outputs: dict[str, np.ndarray], label_names: Sequence[str],
                data: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Per sentence: its words and their IOB2 tags."""
  del data
  return [{"guid": e.guid, "tokens": list(e.words), "tags": tags}
          for e, tags in zip(split.examples, _tags(split, outputs, label_names))]


def _model(config: BertConfig, label_names: Sequence[str] | None) -> nn.Module:
  return BertForTokenClassification(config, num_labels=len(label_names) if label_names else 2)


NER = TaskKind(
    model=_model, loss=loss, outputs=("logits",),
    labels=lambda seq_len: {"labels": ((seq_len,), "int32")}, validate=validate_data,
    read=_read, read_unlabelled=read_unlabelled, label_vocab=tag_vocab, convert=_convert,
    score=score, predictions=predictions, main_metric="f1", packs="tokens")
