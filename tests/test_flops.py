"""The FLOPs formula (`jaxfm.train.flops`) against XLA's own count of the compiled gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfm import sharding
from jaxfm.models import BertForMaskedLM, BertForSequenceClassification, BertModel, preset
from jaxfm.train import flops

CFG = preset("tiny", vocab_size=300, num_layers=2, max_position_embeddings=64)
BATCH, SEQ = 4, 64


def _xla_flops_of_gradient(model, output, *extra) -> float:
  ids = np.ones((BATCH, SEQ), np.int32)
  params = sharding.unbox(model.init(jax.random.key(0), ids, ids, ids, *extra))["params"]
  grad = jax.grad(lambda p: jnp.sum(output(model.apply({"params": p}, ids, ids, ids, *extra))))
  return jax.jit(grad).lower(params).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("scan_layers", [False, True])
def test_classifier_flops_match_xla_count_with_and_without_the_pruned_last_layer(scan_layers):
  # XLA counts every op (LayerNorm, softmax, GELU too); the formula only the matmuls. XLA counts
  # a scan's body once, so the scanned stack (2 layers: 1 scanned + the last) counts the same.
  config = CFG.replace(scan_layers=scan_layers)
  full = _xla_flops_of_gradient(BertModel(config), lambda out: out[1])  # pooled, every position
  pruned = _xla_flops_of_gradient(BertForSequenceClassification(config, 2), lambda out: out)
  tokens = BATCH * SEQ
  assert full == pytest.approx(flops.encoder_flops_per_token(CFG, SEQ) * tokens, rel=0.1)
  assert pruned == pytest.approx(flops.classification_flops_per_token(CFG, SEQ) * tokens, rel=0.1)
  assert pruned / full == pytest.approx(flops.classification_flops_per_token(CFG, SEQ)
                                        / flops.encoder_flops_per_token(CFG, SEQ), rel=0.02)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_mlm_flops_match_xla_count_with_the_last_layer_at_predicted_positions(scan_layers):
  predictions = 8
  positions = np.tile(np.arange(0, SEQ, SEQ // predictions, dtype=np.int32), (BATCH, 1))
  model = BertForMaskedLM(CFG.replace(scan_layers=scan_layers))
  full = _xla_flops_of_gradient(model, lambda logits: logits)  # every position
  pruned = _xla_flops_of_gradient(model, lambda logits: logits, positions)
  tokens = BATCH * SEQ
  assert full == pytest.approx(flops.mlm_flops_per_token(CFG, SEQ, SEQ) * tokens, rel=0.1)
  assert pruned == pytest.approx(flops.mlm_flops_per_token(CFG, SEQ, predictions) * tokens,
                                 rel=0.1)
  assert pruned / full == pytest.approx(flops.mlm_flops_per_token(CFG, SEQ, predictions)
                                        / flops.mlm_flops_per_token(CFG, SEQ, SEQ), rel=0.03)


def test_packed_classifier_flops_count_the_last_layer_at_every_cls_slot():
  slots = 8
  segments = np.repeat(np.arange(1, slots + 1, dtype=np.int32), SEQ // slots)[None]  # [1, SEQ]
  segments = np.tile(segments, (BATCH, 1))
  positions = np.tile(np.arange(SEQ // slots, dtype=np.int32), (BATCH, slots))
  cls = np.tile(np.arange(0, SEQ, SEQ // slots, dtype=np.int32), (BATCH, 1))  # [BATCH, slots]
  packed = _xla_flops_of_gradient(BertForSequenceClassification(CFG, 2), lambda out: out, True,
                                  segments, positions, cls)
  one = _xla_flops_of_gradient(BertForSequenceClassification(CFG, 2), lambda out: out)
  tokens = BATCH * SEQ
  assert packed == pytest.approx(
      flops.classification_flops_per_token(CFG, SEQ, examples_per_row=slots) * tokens, rel=0.1)
  assert packed / one == pytest.approx(
      flops.classification_flops_per_token(CFG, SEQ, examples_per_row=slots)
      / flops.classification_flops_per_token(CFG, SEQ), rel=0.03)
