"""Inverted dropout from 16-bit threefry draws: a quarter of the random-number work of `nn.Dropout`.

`flax.linen.Dropout` spends one threefry-2x32 evaluation per element (JAX's partitionable
threefry XORs the two output words into one). Here the cipher runs in counter mode over a
quarter of the elements and both output words are kept, each split into two 16-bit draws, so
one evaluation serves four elements; on XLA:CPU the random bits are otherwise a large share of
a fine-tuning step. The drop probability is `rate` rounded to a multiple of 2**-16
(0.1 -> 0.100006). The counters follow the input's leading axes, so the draws shard like the
activations. `jax.extend.random.threefry2x32_p` is JAX's public handle on the cipher for such
extensions.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

_LEVELS = 1 << 16
_DRAWS_PER_EVALUATION = 4  # two 32-bit output words, two 16-bit draws each


def _counters(shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Distinct (low, high) 32-bit counter words for each position of `shape`: the row-major
  index within the leading index, and the leading index."""
  if math.prod(shape[1:]) >= 1 << 32:
    raise ValueError(f"dropout over {shape}: more than 2**32 elements per leading index")
  low = sum((jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(math.prod(shape[d + 1:]))
             for d in range(1, len(shape))), start=jnp.zeros(shape, jnp.uint32))
  return low, jax.lax.broadcasted_iota(jnp.uint32, shape, 0)


def keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """bool `shape`: True with probability 1 - round(rate * 2**16) / 2**16, independently."""
  *lead, last = shape
  groups = -(-last // _DRAWS_PER_EVALUATION)
  key_words = jax.random.bits(key, (2,), jnp.uint32)  # whatever the key's PRNG implementation
  words_a, words_b = threefry2x32_p.bind(key_words[0], key_words[1],
                                         *_counters((*lead, groups)))  # each [..., groups]
  # Draw j of an evaluation: half j % 2 of word j // 2. Written with broadcasts and selects
  # (no concatenate), so XLA fuses it into the ops that apply the mask.
  j = jax.lax.broadcasted_iota(jnp.uint32, (*lead, groups, _DRAWS_PER_EVALUATION), len(lead) + 1)
  word = jnp.where(j < 2, words_a[..., None], words_b[..., None])  # [..., groups, 4]
  draws = ((word >> ((j & 1) * 16)) & 0xFFFF).reshape(*lead, -1)[..., :last]  # [..., last]
  return draws >= jnp.uint32(round(rate * _LEVELS))


class Dropout(nn.Module):
  """`nn.Dropout(rate)` with `keep_mask`'s draws; the "dropout" RNG stream."""
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = keep_mask(self.make_rng("dropout"), x.shape, self.rate)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))
