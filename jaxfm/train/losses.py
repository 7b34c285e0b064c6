"""Task losses in the `LossFn` form of `jaxfm.train.step`: (params, batch, rng) -> (loss_sum, sums)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxfm.models import BertForMaskedLM
from jaxfm.train.cross_entropy import tied_decoder_cross_entropy
from jaxfm.train.step import Batch, LossFn, Sums


def _apply_kwargs(rng: jax.Array | None) -> dict[str, Any]:
  if rng is None:
    return dict(deterministic=True)
  return dict(deterministic=False, rngs={"dropout": rng})


def mlm_loss(model: BertForMaskedLM) -> LossFn:
  """Masked-LM cross-entropy over the `masked_positions` of each example, through the tied
  decoder a vocabulary chunk at a time (`model.config.loss_vocab_chunk`).

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; masked_positions,
  masked_ids int32 [b, p]; masked_weights float32 [b, p] (0 = padding prediction).
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    features, table, bias = model.apply(
        {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
        batch["masked_positions"], method=BertForMaskedLM.decoder_inputs, **_apply_kwargs(rng))
    weights = batch["masked_weights"].reshape(-1)  # [b * p]
    nll, correct = tied_decoder_cross_entropy(
        features.reshape(-1, features.shape[-1]), table, bias, batch["masked_ids"].reshape(-1),
        model.config.loss_vocab_chunk)
    loss_sum = jnp.sum(nll * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights),
                      "correct": jnp.sum(correct * weights)}
  return loss_fn


def _encode(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None) -> Any:
  """The task model's output on the batch's (input_ids, token_type_ids, attention_mask)."""
  return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                     batch["attention_mask"], **_apply_kwargs(rng))


def classification_loss(model: nn.Module, regression: bool = False) -> LossFn:
  """Cross-entropy over classes, or squared error when `regression` (one output).

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; labels int32 [b] (float32
  for regression); weights float32 [b] (0 = padding example).
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    logits = _encode(model, params, batch, rng)  # [b, classes]
    weights = batch["weights"]
    if regression:
      per_example = jnp.square(logits[:, 0] - batch["labels"])  # [b]
      sums = {}
    else:
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
      sums = {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["labels"]) * weights)}
    loss_sum = jnp.sum(per_example * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), **sums}
  return loss_fn


def token_classification_loss(model: nn.Module) -> LossFn:
  """Cross-entropy per labelled token; label -100 marks positions without a loss.

  Batch: input_ids, token_type_ids, attention_mask, labels int32 [b, t]; weights float32 [b].
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    logits = _encode(model, params, batch, rng)  # [b, t, labels]
    labels = batch["labels"]
    weights = (labels >= 0) * batch["weights"][:, None]  # [b, t]
    safe = jnp.maximum(labels, 0)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, safe)  # [b, t]
    loss_sum = jnp.sum(nll * weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == safe) * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": correct}
  return loss_fn


def span_loss(model: nn.Module) -> LossFn:
  """Mean of the start and end cross-entropies over the sequence (extractive QA).

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; start_positions,
  end_positions int32 [b] (0 = [CLS] when the window holds no answer); weights float32 [b].
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    start_logits, end_logits = _encode(model, params, batch, rng)  # [b, t] each
    weights = batch["weights"]
    nll = 0.5 * (
        optax.softmax_cross_entropy_with_integer_labels(start_logits, batch["start_positions"])
        + optax.softmax_cross_entropy_with_integer_labels(end_logits, batch["end_positions"]))
    loss_sum = jnp.sum(nll * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights)}
  return loss_fn


def predict_outputs(model: nn.Module, names: tuple[str, ...]) -> Callable[[Any, Batch], Sums]:
  """`(params, batch) -> {name: model output}` without dropout, plus the batch's
  `feature_index` [b] (-1 for padding) so outputs can be matched to their features."""
  def predict(params: Any, batch: Batch) -> Sums:
    out = _encode(model, params, batch, None)
    out = out if isinstance(out, tuple) else (out,)
    return {"feature_index": batch["feature_index"], **dict(zip(names, out, strict=True))}
  return predict
