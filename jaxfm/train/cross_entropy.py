"""Cross-entropy through a tied decoder, a vocabulary chunk at a time.

`tied_decoder_cross_entropy(x, table, bias, labels, chunk)` gives what
`optax.softmax_cross_entropy_with_integer_labels(x @ table.T + bias, labels)` and
`argmax(logits) == labels` give, with the same gradients, without ever holding the
[n, vocab] logits: the forward pass keeps a running log-sum-exp over vocabulary chunks, and the
backward pass recomputes each chunk's logits and turns them straight into that chunk's share of
the gradients (d_x, the table rows, the bias). Every [n, chunk] intermediate stays in cache;
the unchunked head makes several passes over [n, 30522] float32 arrays (78 MB at n = 640), and
on a CPU those passes, not the matmuls, dominate it. The cost is the logits matmul twice (once
per pass). The logits and their gradient are never whole, though at pretraining's 20
predictions per sequence the step's peak memory lies elsewhere.

"Correct" is `label logit >= max logit`, which differs from `argmax == label` only on an exact
tie (argmax picks the first index).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Array = jax.Array


def _spans(vocab: int, chunk: int) -> list[tuple[int, int]]:
  chunk = chunk or vocab
  return [(start, min(start + chunk, vocab)) for start in range(0, vocab, chunk)]


def _rows(table: Array, start: int, stop: int, dtype) -> Array:
  return jax.lax.slice_in_dim(table, start, stop).astype(dtype)  # [c, e]


def _with_ones(x: Array) -> Array:
  """[n, e] -> [n, e + 1]: a ones column, so the bias is one more column of the matmul."""
  return jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=-1)


def _logits(x1: Array, table: Array, bias: Array, start: int, stop: int) -> Array:
  # x1 [n, e + 1] (`_with_ones`), table [v, e], bias [v] -> float32 [n, c] for rows start..stop.
  # Folding the bias into the matmul saves a pass over [n, c] (and its column sum backward).
  rows = jnp.concatenate([_rows(table, start, stop, x1.dtype),
                          bias[start:stop, None].astype(x1.dtype)], axis=-1)  # [c, e + 1]
  return jnp.einsum("ne,ce->nc", x1, rows, preferred_element_type=jnp.float32)


def _forward(x: Array, table: Array, bias: Array, labels: Array, chunk: int):
  n = x.shape[0]
  top = jnp.full((n,), -jnp.inf, jnp.float32)  # running max logit
  total = jnp.zeros((n,), jnp.float32)  # running sum of exp(logit - top)
  label_logit = jnp.zeros((n,), jnp.float32)
  x1 = _with_ones(x)
  for start, stop in _spans(table.shape[0], chunk):
    logits = _logits(x1, table, bias, start, stop)  # [n, c]
    new_top = jnp.maximum(top, jnp.max(logits, axis=-1))
    total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(logits - new_top[:, None]), axis=-1)
    top = new_top
    index = jnp.clip(labels - start, 0, stop - start - 1)[:, None]
    here = (labels >= start) & (labels < stop)
    label_logit = jnp.where(here, jnp.take_along_axis(logits, index, axis=-1)[:, 0], label_logit)
  log_sum_exp = top + jnp.log(total)
  return (log_sum_exp - label_logit, label_logit >= top), (x, table, bias, labels, log_sum_exp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def tied_decoder_cross_entropy(x: Array, table: Array, bias: Array, labels: Array,
                               chunk: int) -> tuple[Array, Array]:
  """x [n, embedding], table [vocab, embedding], bias [vocab], int labels [n]; `chunk`
  vocabulary rows at a time (0 = all) -> (negative log-likelihood [n] float32, label is the
  top logit [n] bool). Matmuls run in x's dtype with float32 accumulation; the bias joins the
  logits matmul as one more column (so in x's dtype too)."""
  return _forward(x, table, bias, labels, chunk)[0]


def _backward(chunk: int, residuals, cotangents):
  x, table, bias, labels, log_sum_exp = residuals
  g = cotangents[0][:, None]  # [n, 1]; "correct" is boolean and has no gradient
  d_x = jnp.zeros(x.shape, jnp.float32)
  d_rows, d_bias = [], []
  x1 = _with_ones(x)
  for start, stop in _spans(table.shape[0], chunk):
    logits = _logits(x1, table, bias, start, stop)
    words = jax.lax.broadcasted_iota(labels.dtype, logits.shape, 1) + start
    d_logits = (jnp.exp(logits - log_sum_exp[:, None]) - (words == labels[:, None])) * g
    d_low = d_logits.astype(x.dtype)  # [n, c]
    d_x += jnp.einsum("nc,ce->ne", d_low, _rows(table, start, stop, x.dtype),
                      preferred_element_type=jnp.float32)
    d_rows_and_bias = jnp.einsum("nc,ne->ce", d_low, x1, preferred_element_type=jnp.float32)
    d_rows.append(d_rows_and_bias[:, :-1])  # [c, e]
    d_bias.append(d_rows_and_bias[:, -1])  # [c]: the ones column's gradient
  return (d_x.astype(x.dtype), jnp.concatenate(d_rows).astype(table.dtype),
          jnp.concatenate(d_bias).astype(bias.dtype), None)


tied_decoder_cross_entropy.defvjp(_forward, _backward)
