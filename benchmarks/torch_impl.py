"""The peer: transformers' PyTorch BERT, eager, with an AdamW step as a training loop would take.

Same shape, dropout, batch and targets as the jaxfm side; the MLM loss is HF's (labels -100
everywhere but the masked positions), so its head runs at every position.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch
import transformers

from benchmarks.common import NUM_LABELS, VOCAB_SIZE, Case


def hf_config(case: Case) -> transformers.BertConfig:
  a = case.arch
  return transformers.BertConfig(
      vocab_size=VOCAB_SIZE, hidden_size=a["hidden_size"], num_hidden_layers=a["num_layers"],
      num_attention_heads=a["num_heads"], intermediate_size=a["intermediate_size"],
      max_position_embeddings=case.max_positions, type_vocab_size=2, hidden_act="gelu",
      layer_norm_eps=1e-12, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1,
      num_labels=NUM_LABELS)


def inputs(case: Case, batch: dict[str, np.ndarray], device: torch.device) -> dict[str, Any]:
  """HF keyword inputs; MLM labels are the masked ids at the masked positions, else -100."""
  fields = {k: torch.from_numpy(batch[k]).long()
            for k in ("input_ids", "token_type_ids", "attention_mask")}
  if case.task == "mlm":
    labels = np.full(batch["input_ids"].shape, -100, np.int64)
    np.put_along_axis(labels, batch["masked_positions"], batch["masked_ids"], axis=1)
    fields["labels"] = torch.from_numpy(labels)
  else:
    fields["labels"] = torch.from_numpy(batch["labels"]).long()
  return {k: v.to(device) for k, v in fields.items()}


def measure(case: Case, batch: dict[str, np.ndarray],
            timer: Callable[[Callable[[], None]], dict[str, Any]]) -> dict[str, Any]:
  """Times forward + backward + global-norm clip + AdamW update on `batch` (reused every step)."""
  if case.threads:
    torch.set_num_threads(case.threads)
  torch.manual_seed(case.seed)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  cls = (transformers.BertForMaskedLM if case.task == "mlm"
         else transformers.BertForSequenceClassification)
  model = cls(hf_config(case)).to(device).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, eps=1e-6, weight_decay=0.01)
  kwargs = inputs(case, batch, device)
  autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if case.dtype == "bfloat16"
              else contextlib.nullcontext())

  def step() -> None:
    with autocast:
      loss = model(**kwargs).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss.item()  # waits for the device

  timings = timer(step)
  return {**timings, "compile_s": 0.0, "device": str(device), "devices": 1,
          "threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation}  # pylint: disable=protected-access
