"""Masked-LM pretraining: the loss through the tied decoder, the metric summary, the batch spec
and the loop's `Task`. The head is `models.heads.BertForMaskedLM`; the batches come from
`jaxfm.data.loader` (packing and masking in `jaxfm.data.pretraining`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfm.models import BertConfig, BertForMaskedLM
from jaxfm.tasks.base import BatchSpec, apply_kwargs
from jaxfm.train.cross_entropy import tied_decoder_cross_entropy
from jaxfm.train.flops import mlm_flops_per_token
from jaxfm.train.loop import Task
from jaxfm.train.step import Batch, LossFn, Sums


def loss(model: BertForMaskedLM) -> LossFn:
  """Masked-LM cross-entropy over the `masked_positions` of each example, through the tied
  decoder a vocabulary chunk at a time (`model.config.loss_vocab_chunk`).

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; masked_positions,
  masked_ids int32 [b, p]; masked_weights float32 [b, p] (0 = padding prediction).
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    features, table, bias = model.apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        batch["masked_positions"], method=BertForMaskedLM.decoder_inputs, **apply_kwargs(rng))
    weights = batch["masked_weights"].reshape(-1)  # [b * p]
    nll, correct = tied_decoder_cross_entropy(
        features.reshape(-1, features.shape[-1]), table, bias, batch["masked_ids"].reshape(-1),
        model.config.loss_vocab_chunk)
    loss_sum = jnp.sum(nll * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights),
                      "correct": jnp.sum(correct * weights)}
  return loss_fn


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Loss and accuracy per masked token."""
  weight = max(sums["weight"], 1.0)
  return {"loss": sums["loss_sum"] / weight, "accuracy": sums["correct"] / weight}


def batch_spec(seq_len: int, predictions: int) -> BatchSpec:
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
              loss_fn=loss(model), summarize=summarize,
              flops_per_token=lambda length: mlm_flops_per_token(config, length, predictions),
              batch_spec=batch_spec(seq_len, predictions))
