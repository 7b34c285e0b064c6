"""Task models: the encoder plus one head each (MLM, sequence, token, span)."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfm.models.config import BertConfig
from jaxfm.models.encoder import (ACT_BATCH, ACT_LENGTH, CLASSES, EMBED, EMBED_OUT, VOCAB,
                                  BertEncoder, activation, dense, dropout, layer_norm)

Array = jax.Array


class MlmHead(nn.Module):
  """BERT's MLM head: dense + activation + LayerNorm, then the tied decoder plus a bias."""

  config: BertConfig

  def setup(self):
    cfg = self.config
    self.transform = dense(cfg, cfg.embedding_dim, (EMBED, EMBED_OUT), "transform")
    self.transform_norm = layer_norm(cfg, "transform_norm")
    self.bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                                (VOCAB,)),
                           (cfg.vocab_size,), jnp.float32)

  def features(self, hidden: Array) -> Array:
    """[..., hidden] -> [..., embedding]: what the tied decoder multiplies."""
    return self.transform_norm(activation(self.config.hidden_act)(self.transform(hidden)))

  def __call__(self, hidden: Array, attend: Callable[[Array], Array]) -> Array:
    # hidden: [batch, positions, hidden] -> logits [batch, positions, vocab] (float32)
    return attend(self.features(hidden)).astype(jnp.float32) + self.bias


class BertForMaskedLM(nn.Module):
  """Encoder + MLM head whose decoder is tied to the word embeddings.

  With `masked_positions` ([batch, predictions] int) the head, and the encoder's last layer,
  run only at those positions, which is what pretraining needs and is far cheaper at small sizes.
  `decoder_inputs` stops before the decoder, for losses that fuse it
  (`jaxfm.train.cross_entropy`) instead of materialising the logits.
  """

  config: BertConfig

  def setup(self):
    self.encoder = BertEncoder(self.config)
    self.mlm_head = MlmHead(self.config)

  def _predicted_hidden(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
                        masked_positions: Array | None, deterministic: bool) -> Array:
    # [b, p, hidden] at the masked positions ([b, t, hidden] when None): the encoder's last
    # layer computes only those.
    return self.encoder(input_ids, token_type_ids, attention_mask, deterministic,
                        output_positions=masked_positions)

  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               masked_positions: Array | None = None, deterministic: bool = True) -> Array:
    hidden = self._predicted_hidden(input_ids, token_type_ids, attention_mask, masked_positions,
                                    deterministic)
    return self.mlm_head(hidden, self.encoder.attend)  # [b, p or t, vocab]

  def decoder_inputs(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
                     masked_positions: Array, deterministic: bool = True
                     ) -> tuple[Array, Array, Array]:
    """(features [b, p, embedding], word table [vocab, embedding], bias [vocab]): the logits
    are `features @ table.T + bias`."""
    hidden = self._predicted_hidden(input_ids, token_type_ids, attention_mask, masked_positions,
                                    deterministic)
    table = self.encoder.embeddings.word_embeddings.embedding
    return self.mlm_head.features(hidden), table, self.mlm_head.bias


class BertForSequenceClassification(nn.Module):
  """Encoder + pooler + dropout + linear layer. `num_labels=1` is regression.

  The pooler reads each example's first token only, so the encoder's last layer runs there
  only (`BertEncoder(output_positions=...)`): the same logits and gradients for fewer FLOPs.
  Packed rows (`jaxfm.data.packing`) give `segment_ids`, `position_ids` and `cls_positions`
  ([batch, slots] int, -1 for an empty slot): one output per slot.
  """

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True, segment_ids: Array | None = None,
               position_ids: Array | None = None, cls_positions: Array | None = None) -> Array:
    encoder = BertEncoder(self.config, name="encoder")
    if cls_positions is None:
      first = jnp.zeros((input_ids.shape[0], 1), jnp.int32)  # [batch, 1]: position 0
    else:
      first = jnp.maximum(cls_positions, 0)  # [batch, slots]; empty slots read position 0
    hidden = encoder(input_ids, token_type_ids, attention_mask, deterministic,
                     output_positions=first, segment_ids=segment_ids,
                     position_ids=position_ids)  # [batch, 1 or slots, hidden]
    pooled = encoder.pool(hidden[:, 0] if cls_positions is None else hidden)
    pooled = dropout(self.config, self.config.hidden_dropout)(pooled, deterministic=deterministic)
    logits = dense(self.config, self.num_labels, (EMBED, CLASSES), "classifier")(pooled)
    return logits.astype(jnp.float32)  # [batch, num_labels], or [batch, slots, num_labels]


class BertForTokenClassification(nn.Module):
  """Encoder + dropout + per-token linear layer (NER, POS); packed rows as in `BertEncoder`."""

  config: BertConfig
  num_labels: int

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True, segment_ids: Array | None = None,
               position_ids: Array | None = None) -> Array:
    hidden = BertEncoder(self.config, name="encoder")(
        input_ids, token_type_ids, attention_mask, deterministic, segment_ids=segment_ids,
        position_ids=position_ids)
    hidden = dropout(self.config, self.config.hidden_dropout)(hidden, deterministic=deterministic)
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
    return hidden, encoder.pool(hidden[:, 0])  # [batch, length, hidden], [batch, hidden]
