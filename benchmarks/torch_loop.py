r"""The peer a user would write: a plain transformers + PyTorch fine-tuning loop, dynamic padding.

  python -m benchmarks.torch_loop --model=MODEL_DIR --task=classification \
      --train=SST-2/train.tsv --dev=SST-2/dev.tsv [--text_fields=sentence] [--epochs=1] ...

transformers' own tokenizer (`BertTokenizerFast`), model (`BertFor…Classification`), collators
(`DataCollatorWithPadding`: each batch padded to its longest row) and linear-warmup schedule;
AdamW without decay on biases and LayerNorm; global-norm clipping. Classification reads a TSV
with a header (one text field or two for pairs, a label field); NER reads CoNLL (`TOKEN … TAG`
lines, the tag in the last column, blank lines between sentences) and labels the first
sub-word of each word, scored with seqeval. Prints one JSON line: the dev score, the steps and
the wall time from process start (`benchmarks.time_to_result` runs it beside `jaxfm.finetune`).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # before the heavy imports: they are part of what a user waits for

import csv  # pylint: disable=g-import-not-at-top,wrong-import-position
import json  # pylint: disable=g-import-not-at-top,wrong-import-position
import math  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position

_MODEL = flags.DEFINE_string("model", None, "A transformers BERT folder (config, weights, vocab).")
_TASK = flags.DEFINE_enum("task", "classification", ["classification", "ner"], "Task kind.")
_TRAIN = flags.DEFINE_string("train", None, "Training file (TSV or CoNLL).")
_DEV = flags.DEFINE_string("dev", None, "Dev file, scored at the end.")
_TEXT_FIELDS = flags.DEFINE_list("text_fields", ["sentence"], "Classification: 1 or 2 fields.")
_LABEL_FIELD = flags.DEFINE_string("label_field", "label", "Classification: the label field.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", 0, "0 = all; else the first N.")
_MAX_LEN = flags.DEFINE_integer("max_seq_length", 128, "Truncation length.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_EPOCHS = flags.DEFINE_float("epochs", 3.0, "Epochs over the training examples.")
_LR = flags.DEFINE_float("learning_rate", 5e-5, "Peak learning rate.")
_WARMUP = flags.DEFINE_float("warmup_ratio", 0.1, "Share of the steps with linear warmup.")
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.01, "AdamW weight decay.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the head, dropout and data order.")
flags.mark_flags_as_required(["model", "train", "dev"])


def _read_tsv(path: str) -> list[dict[str, str]]:
  with open(path, encoding="utf-8", newline="") as f:
    return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _read_conll(path: str) -> list[tuple[list[str], list[str]]]:
  sentences, words, tags = [], [], []
  with open(path, encoding="utf-8") as f:
    for line in [*f, ""]:
      parts = line.split()
      if parts and parts[0] != "-DOCSTART-":
        words.append(parts[0])
        tags.append(parts[-1])
      elif words:
        sentences.append((words, tags))
        words, tags = [], []
  return sentences


def _classification(tokenizer, rows: list[dict[str, str]], labels: list[str]) -> list[dict]:
  texts = [[row[f] for f in _TEXT_FIELDS.value] for row in rows]
  encoded = tokenizer(*zip(*texts), truncation=True, max_length=_MAX_LEN.value)
  ids = {name: i for i, name in enumerate(labels)}
  return [{**{k: v[i] for k, v in encoded.items()}, "labels": ids[row[_LABEL_FIELD.value]]}
          for i, row in enumerate(rows)]


def _ner(tokenizer, sentences: list[tuple[list[str], list[str]]], labels: list[str]
         ) -> list[dict]:
  ids = {name: i for i, name in enumerate(labels)}
  encoded = tokenizer([words for words, _ in sentences], is_split_into_words=True,
                      truncation=True, max_length=_MAX_LEN.value)
  features = []
  for i, (_, tags) in enumerate(sentences):
    previous, aligned = None, []
    for word in encoded.word_ids(i):
      aligned.append(-100 if word is None or word == previous else ids[tags[word]])
      previous = word
    features.append({**{k: v[i] for k, v in encoded.items()}, "labels": aligned})
  return features


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
  no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
  return torch.optim.AdamW([{"params": decay, "weight_decay": _WEIGHT_DECAY.value},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=_LR.value, betas=(0.9, 0.999), eps=1e-6)


def _score(model, loader, labels: list[str]) -> dict[str, float]:
  model.eval()
  predicted, gold = [], []
  with torch.no_grad():
    for batch in loader:
      target = batch.pop("labels")
      predicted.append(model(**batch).logits.argmax(-1).numpy())
      gold.append(target.numpy())
  if _TASK.value == "classification":
    return {"accuracy": float(np.mean(np.concatenate(predicted) == np.concatenate(gold)))}
  import seqeval.metrics  # pylint: disable=g-import-not-at-top
  pred_tags, gold_tags = [], []
  for p_batch, g_batch in zip(predicted, gold):
    for p, g in zip(p_batch, g_batch):
      keep = g != -100
      pred_tags.append([labels[t] for t in p[keep]])
      gold_tags.append([labels[t] for t in g[keep]])
  return {"f1": float(seqeval.metrics.f1_score(gold_tags, pred_tags))}


def main(argv):
  del argv
  torch.manual_seed(_SEED.value)
  tokenizer = transformers.BertTokenizerFast.from_pretrained(_MODEL.value)
  if _TASK.value == "classification":
    train_rows, dev_rows = _read_tsv(_TRAIN.value), _read_tsv(_DEV.value)
    train_rows = train_rows[:_MAX_TRAIN.value or None]
    labels = sorted({row[_LABEL_FIELD.value] for row in train_rows})
    train, dev = _classification(tokenizer, train_rows, labels), _classification(
        tokenizer, dev_rows, labels)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    model_class = transformers.BertForSequenceClassification
  else:
    train_rows, dev_rows = _read_conll(_TRAIN.value), _read_conll(_DEV.value)
    train_rows = train_rows[:_MAX_TRAIN.value or None]
    labels = sorted({tag for _, tags in train_rows for tag in tags})
    train, dev = _ner(tokenizer, train_rows, labels), _ner(tokenizer, dev_rows, labels)
    collator = transformers.DataCollatorForTokenClassification(tokenizer)
    model_class = transformers.BertForTokenClassification
  model = model_class.from_pretrained(_MODEL.value, num_labels=len(labels))
  generator = torch.Generator().manual_seed(_SEED.value)
  train_loader = torch.utils.data.DataLoader(train, batch_size=_BATCH.value, shuffle=True,
                                             collate_fn=collator, generator=generator)
  dev_loader = torch.utils.data.DataLoader(dev, batch_size=_BATCH.value, collate_fn=collator)
  steps = max(1, math.ceil(_EPOCHS.value * len(train_loader)))
  optimizer = _optimizer(model)
  schedule = transformers.get_linear_schedule_with_warmup(
      optimizer, round(_WARMUP.value * steps), steps)
  train_start, step = time.time(), 0
  model.train()
  while step < steps:
    for batch in train_loader:
      loss = model(**batch).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      optimizer.step()
      schedule.step()
      optimizer.zero_grad()
      step += 1
      if step == steps:
        break
  train_s = time.time() - train_start
  score = _score(model, dev_loader, labels)
  print(json.dumps({"impl": "torch", "task": _TASK.value, **score, "steps": steps,
                    "train_s": round(train_s, 1), "wall_s": round(time.time() - PROCESS_START, 1),
                    "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
  app.run(main)
