"""jaxfm.cpu.dropout: 16-bit draws with the statistics of Bernoulli dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfm.cpu.dropout import Dropout, keep_mask


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_keep_fraction_matches_the_rate(rate):
  keep = np.asarray(keep_mask(jax.random.key(0), (256, 1000), rate))
  expected = 1 - round(rate * 65536) / 65536
  sigma = np.sqrt(expected * (1 - expected) / keep.size)
  assert abs(keep.mean() - expected) < 4 * sigma, (keep.mean(), expected)


def test_the_four_draws_of_an_evaluation_are_independent():
  # (4096, 64): 16 threefry evaluations per row; the four 16-bit draws of evaluation g land
  # in columns 4g .. 4g + 3 (low and high halves of the first word, then of the second).
  keep = np.asarray(keep_mask(jax.random.key(1), (4096, 64), 0.5)).reshape(4096, 16, 4)
  draws = [keep[..., i].ravel() for i in range(4)]
  sigma = np.sqrt(0.25 * 0.75 / draws[0].size)
  for i in range(4):
    for j in range(i + 1, 4):
      assert abs(np.mean(draws[i] & draws[j]) - 0.25) < 4 * sigma, (i, j)
      assert abs(np.corrcoef(draws[i], draws[j])[0, 1]) < 4 / np.sqrt(draws[i].size), (i, j)


def test_rows_and_shapes_get_distinct_draws():
  keep = np.asarray(keep_mask(jax.random.key(5), (64, 3, 40), 0.5))
  flat = keep.reshape(64 * 3, 40)
  assert len({row.tobytes() for row in flat}) == flat.shape[0]  # no repeated counters
  assert keep_mask(jax.random.key(5), (7,), 0.5).shape == (7,)


def test_masks_depend_on_the_key_only():
  a, b, c = (np.asarray(keep_mask(jax.random.key(k), (8, 7), 0.3)) for k in (2, 2, 3))
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and a.shape == (8, 7)  # odd last axis


def test_dropout_module_scales_kept_values_and_is_identity_when_deterministic():
  x = jnp.arange(1.0, 401.0).reshape(20, 20)
  layer = Dropout(0.25)
  out = np.asarray(layer.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)}))
  kept = out != 0
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.6 < kept.mean() < 0.9
  np.testing.assert_array_equal(layer.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)
  grad = jax.grad(lambda v: layer.apply({}, v, deterministic=False,
                                        rngs={"dropout": jax.random.key(4)}).sum())(x)
  np.testing.assert_allclose(np.asarray(grad), kept / 0.75, rtol=1e-6)
