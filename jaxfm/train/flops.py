"""Model FLOPs per token of a training step, for throughput and MFU reporting.

Counting rule (matmuls only; one multiply-add = 2 FLOPs; backward = 2x forward):
  per token, per layer:  6 * (4 H^2 + 2 H I)        dense weights (QKV, out, MLP)
                       + 12 * T * H                 attention scores and weighted sum (full
                                                    bidirectional T x T, no causal halving)
  ELECTRA projection:    6 * E * H                  when embedding_size E != H
  MLM head, per *predicted* position (P of them per T tokens):
                         6 * (H E + E V)            transform + tied decoder
  Classification heads are negligible and not counted. Embedding lookups,
  LayerNorm, softmax, GELU are not counted; remat recomputation is not counted
  (MFU measures useful work).
"""

from __future__ import annotations

from jaxfm.models.config import BertConfig


def encoder_flops_per_token(config: BertConfig, seq_len: int) -> float:
  h, i = config.hidden_size, config.intermediate_size
  per_layer = 6 * (4 * h * h + 2 * h * i) + 12 * seq_len * h
  projection = 6 * config.embedding_dim * h if config.embedding_dim != h else 0
  return config.num_layers * per_layer + projection


def mlm_flops_per_token(config: BertConfig, seq_len: int, predictions_per_seq: int) -> float:
  """Training FLOPs per input token for MLM with the head run at predicted positions only."""
  e = config.embedding_dim
  head = 6 * (config.hidden_size * e + e * config.vocab_size)
  return encoder_flops_per_token(config, seq_len) + head * predictions_per_seq / seq_len


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
