"""Model FLOPs per token of a training step, for throughput and MFU reporting.

Counting rule (matmuls only; one multiply-add = 2 FLOPs; backward = 2x forward), with A the
layer's attention width, heads x head size (H unless heads were pruned, `BertConfig.pruned_heads`):
  per token, per layer:  6 * (4 H A + 2 H I)        dense weights (QKV, out, MLP)
                       + 12 * T * A                 attention scores and weighted sum (full
                                                    bidirectional T x T, no causal halving)
  ELECTRA projection:    6 * E * H                  when embedding_size E != H
  MLM head, per *predicted* position (P of them per T tokens):
                         6 * (H E + E V)            transform + tied decoder
  The last layer computes only the positions its head reads
  (`BertEncoder(output_positions=...)`): position 0 for sequence classification, the P
  predicted positions for MLM. There that layer costs, per token,
                         6 * 2 H A + (6 * (2 H A + 2 H I) + 12 * T * A) * P / T
  (keys and values everywhere; queries, attention, output projection and MLP at the P
  positions; P = 1 for classification, its [CLS] slots for packed rows). Classification heads
  are negligible and not counted. Embedding lookups, LayerNorm, softmax, GELU are not counted;
  remat recomputation is not counted (MFU measures useful work).
"""

from __future__ import annotations

from jaxfm.models.config import BertConfig


def encoder_flops_per_token(config: BertConfig, seq_len: int,
                            last_layer_outputs: int | None = None) -> float:
  """Training FLOPs per input token of the encoder; `last_layer_outputs`: the number of
  positions its last layer computes (None: all)."""
  h, i = config.hidden_size, config.intermediate_size
  outputs = seq_len if last_layer_outputs is None else last_layer_outputs
  total = 6 * config.embedding_dim * h if config.embedding_dim != h else 0  # the projection
  for layer in range(config.num_layers):
    a = config.layer_heads(layer) * config.head_dim  # attention width
    keys_values = 6 * 2 * h * a
    per_query = 6 * (2 * h * a + 2 * h * i) + 12 * seq_len * a  # Q, out, MLP, attention
    last = layer == config.num_layers - 1
    total += keys_values + per_query * (outputs / seq_len if last else 1)
  return total


def classification_flops_per_token(config: BertConfig, seq_len: int,
                                   examples_per_row: int = 1) -> float:
  """Training FLOPs per input token of `BertForSequenceClassification` (see the docstring);
  packed rows (`data.packing`) run the last layer at each of their `examples_per_row` [CLS]
  slots."""
  return encoder_flops_per_token(config, seq_len, examples_per_row)


def mlm_flops_per_token(config: BertConfig, seq_len: int, predictions_per_seq: int) -> float:
  """Training FLOPs per input token for MLM with the head and the last layer run at the
  predicted positions only; `predictions_per_seq = seq_len` is the full computation."""
  e = config.embedding_dim
  head = 6 * (config.hidden_size * e + e * config.vocab_size)
  return (encoder_flops_per_token(config, seq_len, predictions_per_seq)
          + head * predictions_per_seq / seq_len)


# Peak dense bf16 FLOP/s per chip, from vendor specs; used only for MFU logging.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
  """Known peak FLOP/s for a device kind, or None (e.g. CPU: MFU is then not logged)."""
  return PEAK_FLOPS.get(device_kind)
