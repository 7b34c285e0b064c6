"""Task models: the encoder plus one head each (MLM, sequence, token, span)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfm.models.config import BertConfig
from jaxfm.models.dropout import Dropout
from jaxfm.models.encoder import (ACT_BATCH, ACT_LENGTH, CLASSES, EMBED, EMBED_OUT, VOCAB,
                                  BertEncoder, activation, dense, layer_norm)

Array = jax.Array


class MlmHead(nn.Module):
  """BERT's MLM head: dense + activation + LayerNorm, then the tied decoder plus a bias."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array, attend: Callable[[Array], Array]) -> Array:
    # hidden: [batch, positions, hidden] -> logits [batch, positions, vocab] (float32)
    cfg = self.config
    x = dense(cfg, cfg.embedding_dim, (EMBED, EMBED_OUT), "transform")(hidden)
    x = layer_norm(cfg, "transform_norm")(activation(cfg.hidden_act)(x))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (VOCAB,)),
                      (cfg.vocab_size,), jnp.float32)
    return attend(x).astype(jnp.float32) + bias


class BertForMaskedLM(nn.Module):
  """Encoder + MLM head whose decoder is tied to the word embeddings.

  With `masked_positions` ([batch, predictions] int) the head runs only at those
  positions, which is what pretraining needs and is far cheaper at small sizes.
  """

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               masked_positions: Array | None = None, deterministic: bool = True) -> Array:
    encoder = BertEncoder(self.config, name="encoder")
    hidden = encoder(input_ids, token_type_ids, attention_mask, deterministic)
    if masked_positions is not None:
      hidden = jnp.take_along_axis(hidden, masked_positions[..., None], axis=1)  # [b, p, hidden]
    return MlmHead(self.config, name="mlm_head")(hidden, encoder.attend)


class BertForSequenceClassification(nn.Module):
  """Encoder + pooler + dropout + linear layer. `num_labels=1` is regression."""

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True) -> Array:
    encoder = BertEncoder(self.config, name="encoder")
    pooled = encoder.pool(encoder(input_ids, token_type_ids, attention_mask, deterministic))
    pooled = Dropout(self.config.hidden_dropout)(pooled, deterministic=deterministic)
    logits = dense(self.config, self.num_labels, (EMBED, CLASSES), "classifier")(pooled)
    return logits.astype(jnp.float32)  # [batch, num_labels]


class BertForTokenClassification(nn.Module):
  """Encoder + dropout + per-token linear layer (NER, POS)."""

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True) -> Array:
    hidden = BertEncoder(self.config, name="encoder")(
        input_ids, token_type_ids, attention_mask, deterministic)
    hidden = Dropout(self.config.hidden_dropout)(hidden, deterministic=deterministic)
    logits = dense(self.config, self.num_labels, (EMBED, CLASSES), "classifier")(hidden)
    return nn.with_logical_constraint(logits.astype(jnp.float32),
                                      (ACT_BATCH, ACT_LENGTH, None))  # [batch, length, labels]


class BertForQuestionAnswering(nn.Module):
  """Encoder + linear span head giving start and end logits per token."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True) -> tuple[Array, Array]:
    hidden = BertEncoder(self.config, name="encoder")(
        input_ids, token_type_ids, attention_mask, deterministic)
    logits = dense(self.config, 2, (EMBED, CLASSES), "span")(hidden).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]  # start, end: [batch, length]


class BertModel(nn.Module):
  """Bare encoder + pooler, the shape of HF `BertModel` (export and parity checks)."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True) -> tuple[Array, Array]:
    encoder = BertEncoder(self.config, name="encoder")
    hidden = encoder(input_ids, token_type_ids, attention_mask, deterministic)
    return hidden, encoder.pool(hidden)  # [batch, length, hidden], [batch, hidden]
