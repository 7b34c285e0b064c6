"""The chunked tied-decoder cross-entropy against optax's on materialised logits."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfm.models import BertForMaskedLM, preset
from jaxfm.tasks import mlm
from jaxfm.train.cross_entropy import tied_decoder_cross_entropy

VOCAB, EMBED, N = 103, 16, 12


def _inputs(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, EMBED)), dtype)
  table = jnp.asarray(rng.normal(size=(VOCAB, EMBED)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=(VOCAB,)), jnp.float32)
  labels = rng.integers(0, VOCAB, N)
  labels[:3] = [0, VOCAB - 1, 64]  # first row, last row, a chunk boundary
  weights = jnp.asarray(rng.uniform(size=N), jnp.float32)
  return x, table, bias, jnp.asarray(labels, jnp.int32), weights


def _reference(x, table, bias, labels):
  logits = jnp.einsum("ne,ve->nv", x, table.astype(x.dtype),
                      preferred_element_type=jnp.float32) + bias
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels), logits


@pytest.mark.parametrize("chunk", [0, 7, 64, VOCAB, 4096])
def test_values_and_gradients_match_optax_on_whole_logits(chunk):
  x, table, bias, labels, weights = _inputs()
  nll, correct = tied_decoder_cross_entropy(x, table, bias, labels, chunk)
  ref_nll, logits = _reference(x, table, bias, labels)
  np.testing.assert_allclose(nll, ref_nll, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(correct, jnp.argmax(logits, -1) == labels)

  ours = jax.grad(lambda *a: jnp.sum(tied_decoder_cross_entropy(*a, labels, chunk)[0] * weights),
                  argnums=(0, 1, 2))(x, table, bias)
  ref = jax.grad(lambda *a: jnp.sum(_reference(*a, labels)[0] * weights),
                 argnums=(0, 1, 2))(x, table, bias)
  for got, want in zip(ours, ref):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_correct_counts_labels_that_are_the_top_logit():
  x, table, bias, _, _ = _inputs(seed=1)
  logits = x @ table.T + bias
  labels = jnp.argmax(logits, -1).at[:4].set(jnp.argmin(logits[:4], -1))  # 4 wrong, rest right
  _, correct = tied_decoder_cross_entropy(x, table, bias, labels, 10)
  np.testing.assert_array_equal(correct, [False] * 4 + [True] * (N - 4))


def test_bfloat16_features_stay_close_to_float32():
  x, table, bias, labels, _ = _inputs(seed=2, dtype=jnp.bfloat16)
  nll, _ = tied_decoder_cross_entropy(x, table, bias, labels, 32)
  ref_nll, _ = _reference(x, table, bias, labels)
  assert nll.dtype == jnp.float32
  np.testing.assert_allclose(nll, ref_nll, rtol=2e-2, atol=2e-2)
  d_x = jax.grad(lambda x: jnp.sum(tied_decoder_cross_entropy(x, table, bias, labels, 32)[0]))(x)
  assert d_x.dtype == jnp.bfloat16


def test_mlm_loss_equals_optax_on_the_models_logits():
  config = preset("tiny", vocab_size=VOCAB, num_layers=1, loss_vocab_chunk=40)
  model = BertForMaskedLM(config)
  rng = np.random.default_rng(3)
  ids = rng.integers(0, VOCAB, (2, 8)).astype(np.int32)
  batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
           "attention_mask": np.ones_like(ids),
           "masked_positions": np.array([[1, 4, 6], [0, 2, 7]], np.int32),
           "masked_ids": rng.integers(0, VOCAB, (2, 3)).astype(np.int32),
           "masked_weights": np.array([[1, 1, 0], [1, 1, 1]], np.float32)}
  params = model.init(jax.random.key(0), ids, ids, np.ones_like(ids),
                      batch["masked_positions"])["params"]
  params = jax.tree.map(lambda p: p.value if hasattr(p, "value") else p, params,
                        is_leaf=lambda p: hasattr(p, "value"))

  def reference(params):
    logits = model.apply({"params": params}, ids, batch["token_type_ids"],
                         batch["attention_mask"], batch["masked_positions"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["masked_ids"])
    return jnp.sum(nll * batch["masked_weights"]), logits

  loss_fn = mlm.loss(model)
  (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
  (ref_loss, logits), ref_grads = jax.value_and_grad(reference, has_aux=True)(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  hits = (jnp.argmax(logits, -1) == batch["masked_ids"]) * batch["masked_weights"]
  assert float(sums["correct"]) == float(jnp.sum(hits))
  assert float(sums["weight"]) == 5.0
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
