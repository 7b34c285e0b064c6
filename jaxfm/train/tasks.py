"""Task bundles for the loop: a model, its loss, how to report metrics and the batch it eats.

`mlm_task` is pretraining's; fine-tuning tasks live in `jaxfm.finetuning`.
"""

from __future__ import annotations

import numpy as np

from jaxfm.models import BertConfig, BertForMaskedLM
from jaxfm.train import losses
from jaxfm.train.flops import mlm_flops_per_token
from jaxfm.train.loop import Task


def mlm_summary(sums: dict[str, float]) -> dict[str, float]:
  """Loss and accuracy per masked token."""
  weight = max(sums["weight"], 1.0)
  return {"loss": sums["loss_sum"] / weight, "accuracy": sums["correct"] / weight}


def mlm_batch_spec(seq_len: int, predictions: int) -> dict[str, tuple[tuple[int, ...], str]]:
  """Per-example shapes and dtypes of an MLM batch (see `jaxfm.data.loader`)."""
  return {
      "input_ids": ((seq_len,), "int32"), "token_type_ids": ((seq_len,), "int32"),
      "attention_mask": ((seq_len,), "int32"), "masked_positions": ((predictions,), "int32"),
      "masked_ids": ((predictions,), "int32"), "masked_weights": ((predictions,), "float32"),
  }


def mlm_task(config: BertConfig, seq_len: int, predictions: int) -> Task:
  """Masked-LM pretraining with the head run at the `predictions` masked positions only."""
  model = BertForMaskedLM(config)
  ids = np.zeros((1, seq_len), np.int32)
  return Task(model=model,
              init_inputs=(ids, ids, np.ones_like(ids), np.zeros((1, predictions), np.int32)),
              loss_fn=losses.mlm_loss(model), summarize=mlm_summary,
              flops_per_token=lambda length: mlm_flops_per_token(config, length, predictions),
              batch_spec=mlm_batch_spec(seq_len, predictions))
