r"""The PyTorch reference for RESULTS.md: fine-tunes transformers' `BertForSequenceClassification`
/ `BertForTokenClassification` with the hyperparameters of a jaxfm fine-tuning config.

  python -m benchmarks.finetune_torch --config=configs/finetune/sst2.py \
      --config.init_from=hf:MODEL_DIR --config.data.train_file=... --config.data.dev_file=... \
      [--config.train.epochs=1 ...]   # the same overrides as the jaxfm run

Same features (jaxfm's readers and converters), same batches in the same order (jaxfm's
loader with the same seed), same schedule (linear warmup + linear decay), AdamW with the same
betas/eps/weight decay (none on LayerNorm and biases), global-norm clipping, dropout, and the
same metric code on the dev set, and the new head initialised exactly as jaxfm initialises it
(same seed). What differs is the framework: torch's kernels and its dropout stream
(`tests/test_finetune_parity.py` shows the updates agree to 2e-6 without dropout). Prints one
JSON line.
"""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np
import torch
import transformers
from absl import app
from ml_collections import config_flags

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm.data import length_groups, loader
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm import tasks, weights

_CONFIG = config_flags.DEFINE_config_file("config", None, "A jaxfm fine-tuning config.",
                                          lock_config=True)

_MODELS = {"classification": transformers.BertForSequenceClassification,
           "ner": transformers.BertForTokenClassification}


def _optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
  rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
  return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                            {"params": rest, "weight_decay": 0.0}],
                           lr=cfg.optim.peak_learning_rate, betas=(cfg.optim.b1, cfg.optim.b2),
                           eps=cfg.optim.eps)


def _copy_jaxfm_head(model: torch.nn.Module, cfg, hf_dir: str, labels: list[str]) -> None:
  """Starts the new head where `jaxfm.finetune` starts it (same seed), so only the dropout
  stream and the arithmetic differ between the two runs."""
  source_config = weights.read_pretrained(f"hf:{hf_dir}", "auto").config
  task = tasks.make_task(cfg.task, source_config, labels, None, cfg.data)
  head = sharding.unbox(task.init_params(jax.random.key(cfg.train.seed)))["classifier"]
  with torch.no_grad():
    model.classifier.weight.copy_(torch.tensor(np.asarray(head["kernel"]).T))
    model.classifier.bias.copy_(torch.tensor(np.asarray(head["bias"])))


def _logits(model: torch.nn.Module, batch: dict[str, np.ndarray]) -> torch.Tensor:
  return model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
               token_type_ids=torch.from_numpy(batch["token_type_ids"]).long(),
               attention_mask=torch.from_numpy(batch["attention_mask"]).long()).logits


def main(argv):
  del argv
  cfg = _CONFIG.value
  if cfg.task not in _MODELS or not cfg.init_from.startswith("hf:"):
    raise app.UsageError("needs task classification or ner and init_from=hf:DIR")
  torch.manual_seed(cfg.train.seed)
  hf_dir = cfg.init_from[3:]
  tokenizer = load_tokenizer(cfg.data.tokenizer or hf_dir, lowercase=cfg.data.lowercase)
  train, labels = tasks.load_split(cfg.task, cfg.data, cfg.data.train_file, tokenizer.backend,
                                   None, cfg.data.max_train_examples)
  dev, _ = tasks.load_split(cfg.task, cfg.data, cfg.data.dev_file, tokenizer.backend, labels,
                            cfg.data.max_eval_examples)
  model = _MODELS[cfg.task].from_pretrained(
      hf_dir, num_labels=len(labels), hidden_dropout_prob=cfg.model.hidden_dropout,
      attention_probs_dropout_prob=cfg.model.attention_dropout)
  _copy_jaxfm_head(model, cfg, hf_dir, labels)
  steps = max(1, math.ceil(cfg.train.epochs * math.ceil(len(train) / cfg.train.batch_size)))
  warmup = round(cfg.optim.warmup_ratio * steps) if cfg.optim.warmup_ratio else \
      cfg.optim.warmup_steps
  optimizer = _optimizer(model, cfg)
  schedule = transformers.get_linear_schedule_with_warmup(optimizer, warmup, steps)
  lengths = train.features["attention_mask"].sum(axis=1)  # [n]
  data = cfg.data
  buckets = (length_groups.auto_buckets(lengths, cfg.train.batch_size, data.seed,
                                        data.group_by_length, data.max_seq_length,
                                        data.max_buckets, data.bucket_multiple)
             if data.length_buckets == "auto" else config_lib.length_buckets(data))
  batches = loader.feature_train_iterator(train.device_arrays(),
                                          loader.HostLayout(cfg.train.batch_size),
                                          seed=data.seed, length_buckets=buckets,
                                          group_by_length=data.group_by_length)
  loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)  # mean over labelled targets
  start = time.perf_counter()
  model.train()
  for _ in range(steps):
    batch = next(batches)
    logits = _logits(model, batch)
    loss = loss_fn(logits.reshape(-1, logits.shape[-1]),
                   torch.from_numpy(batch["labels"]).long().reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    if cfg.optim.clip_norm > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
    optimizer.step()
    schedule.step()
  train_s = time.perf_counter() - start
  model.eval()
  outputs = []
  with torch.no_grad():
    for batch in dev.eval_batches(cfg.train.batch_size, 0, 1):
      outputs.append({"feature_index": batch["feature_index"],
                      "logits": _logits(model, batch).numpy()})
  merged = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}
  keep = merged["feature_index"] >= 0
  merged = {k: v[keep] for k, v in merged.items()}
  metrics = tasks.TASKS[cfg.task].score(dev, merged, labels, cfg.data)
  print(json.dumps({"impl": "torch", "task": cfg.task, "steps": steps, "train_s": train_s,
                    "train_examples": len(train.examples), "dev_examples": len(dev.examples),
                    "dev": {k: v for k, v in metrics.items() if "/" not in k}}))


if __name__ == "__main__":
  app.run(main)
