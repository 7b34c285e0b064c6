"""Small learnable fine-tuning data and a tiny 'pretrained' model dir, made at test time."""

from __future__ import annotations

import json
import os
import pathlib
import signal

import jax
import numpy as np

from jaxfm import interop
from jaxfm.config import finetune_defaults
from jaxfm.models import BertForMaskedLM, preset

POSITIVE = ["good", "great", "fine", "nice", "happy"]
NEGATIVE = ["bad", "awful", "sad", "poor", "ugly"]
FILLER = ["the", "movie", "was", "very", "a", "film", "plot", "and", "it", "is", "of", "what",
          "capital", "?", "."]
PEOPLE, PLACES = ["alice", "bob", "carol"], ["paris", "rome", "oslo"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SEQ = 32


def write_model_dir(root: pathlib.Path) -> pathlib.Path:
  """A randomly initialised BERT-tiny MLM saved as a jaxfm model dir with its vocab.txt."""
  vocab = SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + PEOPLE + PLACES + ["new", "york"]))
  (root / "vocab.txt").write_text("".join(t + "\n" for t in vocab))
  config = preset("tiny", vocab_size=len(vocab), max_position_embeddings=SEQ)
  ids = np.zeros((1, 8), np.int32)
  params = BertForMaskedLM(config).init(jax.random.key(1), ids, ids, np.ones_like(ids))["params"]
  out = root / "pretrained"
  interop.save_model_dir(str(out), config, params, [str(root / "vocab.txt")])
  return out


def write_sentiment(root: pathlib.Path, n_train: int = 160, n_dev: int = 40) -> tuple[str, str]:
  """TSV files with header `sentence<TAB>label`: the label is the sentiment word's polarity."""
  rng = np.random.default_rng(0)

  def rows(n):
    lines = ["sentence\tlabel"]
    for _ in range(n):
      label = int(rng.integers(2))
      words = list(rng.choice(FILLER[:10], int(rng.integers(2, 6))))
      words.insert(int(rng.integers(len(words) + 1)), rng.choice(POSITIVE if label else NEGATIVE))
      lines.append(f"{' '.join(words)}\t{label}")
    return "\n".join(lines) + "\n"
  for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
    (root / name).write_text(rows(n))
  return str(root / "train.tsv"), str(root / "dev.tsv")


def write_conll(root: pathlib.Path, n_train: int = 160, n_dev: int = 40) -> tuple[str, str]:
  """CoNLL files `WORD POS CHUNK TAG`: people are PER, cities (and 'new york') LOC."""
  rng = np.random.default_rng(1)

  def sentence():
    words, tags = [], []
    for _ in range(int(rng.integers(3, 8))):
      r = rng.random()
      if r < 0.2:
        words.append(rng.choice(PEOPLE)), tags.append("B-PER")
      elif r < 0.3:
        words += ["new", "york"]
        tags += ["B-LOC", "I-LOC"]
      elif r < 0.45:
        words.append(rng.choice(PLACES)), tags.append("B-LOC")
      else:
        words.append(rng.choice(FILLER[:10])), tags.append("O")
    return "".join(f"{w} NN O {t}\n" for w, t in zip(words, tags))
  for name, n in (("train.txt", n_train), ("valid.txt", n_dev)):
    (root / name).write_text("-DOCSTART- -X- -X- O\n\n" + "\n".join(sentence() for _ in range(n)))
  return str(root / "train.txt"), str(root / "valid.txt")


def write_squad(root: pathlib.Path, n_train: int = 120, n_dev: int = 30) -> tuple[str, str]:
  """SQuAD v1.1 JSON: 'what is the capital of PERSON ?' answered by the city after the name."""
  rng = np.random.default_rng(2)

  def dataset(n, prefix):
    paragraphs = []
    for i in range(n):
      person, place = rng.choice(PEOPLE), rng.choice(PLACES)
      filler = " ".join(rng.choice(FILLER[:10], int(rng.integers(1, 5))))
      context = f"{filler} the capital of {person} is {place} . {filler}"
      start = context.index(f" is {place}") + 4
      paragraphs.append({"context": context, "qas": [{
          "id": f"{prefix}{i}", "question": f"what is the capital of {person} ?",
          "answers": [{"text": place, "answer_start": start}]}]})
    return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}
  for name, n in (("train.json", n_train), ("dev.json", n_dev)):
    (root / name).write_text(json.dumps(dataset(n, name[:3])))
  return str(root / "train.json"), str(root / "dev.json")


def config(task: str, init_from: str, train: str, dev: str, **train_overrides):
  """A fast fine-tuning config for the fixtures (8-way data parallel, batch 16)."""
  cfg = finetune_defaults()
  cfg.task = task
  cfg.init_from = init_from
  cfg.data.train_file, cfg.data.dev_file = train, dev
  cfg.data.max_seq_length = SEQ
  cfg.data.max_query_length = 12
  cfg.data.doc_stride = 8
  cfg.train.update(dict(batch_size=16, epochs=4.0, log_every=5, progress_bar=False),
                   **train_overrides)
  cfg.optim.peak_learning_rate = 2e-3
  cfg.model.hidden_dropout = 0.0
  cfg.model.attention_dropout = 0.0
  return cfg


class SigtermAtBatch:
  """A train iterator that sends this process SIGTERM while producing batch `at` (None:
  never) and records the length of every batch it gives."""

  def __init__(self, inner, at: int | None):
    self.inner, self.at, self.index, self.lengths = inner, at, 0, []

  def __next__(self):
    self.index += 1
    if self.index == self.at:
      os.kill(os.getpid(), signal.SIGTERM)
    batch = next(self.inner)
    self.lengths.append(batch["input_ids"].shape[1])
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)
