"""Task losses in the `LossFn` form of `jaxfm.train.step`: (params, batch, rng) -> (loss_sum, sums)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxfm.train.step import Batch, LossFn, Sums


def _apply_kwargs(rng: jax.Array | None) -> dict[str, Any]:
  if rng is None:
    return dict(deterministic=True)
  return dict(deterministic=False, rngs={"dropout": rng})


def mlm_loss(model: nn.Module) -> LossFn:
  """Masked-LM cross-entropy over the `masked_positions` of each example.

  Batch: input_ids, token_type_ids, attention_mask int32 [b, t]; masked_positions,
  masked_ids int32 [b, p]; masked_weights float32 [b, p] (0 = padding prediction).
  """
  def loss_fn(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    logits = model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                         batch["attention_mask"], batch["masked_positions"],
                         **_apply_kwargs(rng))  # [b, p, vocab] float32
    labels = batch["masked_ids"]
    weights = batch["masked_weights"]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)  # [b, p]
    loss_sum = jnp.sum(nll * weights)
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weights)
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": correct}
  return loss_fn
