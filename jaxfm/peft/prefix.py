"""Prefix tuning (Li & Liang, 2021) / P-tuning v2: trainable keys and values before every
layer's own, attended by every query, so it works under any head (classification, NER, QA).

As huggingface/peft defines it (`PrefixEncoder`): one embedding [virtual, layers * 2 * hidden]
whose row t holds, per layer, that virtual token's key then its value, each [heads, head_dim];
drawn N(0, 1). With `peft.prefix_projection` the prefix is reparameterised as peft's MLP
(Linear(hidden, hidden), tanh, Linear(hidden, layers * 2 * hidden)) over an embedding
[virtual, hidden], which steadies training; export keeps only its output. The prefix counts as
`virtual` cached positions, so the row's position ids start there (`BertEncoder`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxfm.models.encoder import EMBED, PEFT_PREFIX
from jaxfm.peft.sites import EncoderDims, boxed_like


def init(flat: Mapping[str, Any], rng: jax.Array, settings: Any, text_ids: Any) -> dict[str, Any]:
  """{'embedding': [virtual, layers*2*hidden]}, or with the projection {'embedding': [virtual,
  hidden], 'mlp': {kernel_0 [hidden, hidden], bias_0, kernel_1 [hidden, layers*2*hidden],
  bias_1}} (torch's Linear init, U(±1/sqrt(fan_in)))."""
  del text_ids
  dims = EncoderDims.of(flat)
  n, width = settings.num_virtual_tokens, dims.layers * 2 * dims.hidden
  box = lambda value, names: boxed_like(dims.like, value, names)
  keys = jax.random.split(rng, 5)
  if not settings.prefix_projection:
    return {"embedding": box(jax.random.normal(keys[0], (n, width)), (None, None))}

  def uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

  h = dims.hidden
  mlp = {"kernel_0": box(uniform(keys[1], (h, h), h), (EMBED, None)),
         "bias_0": box(uniform(keys[2], (h,), h), (None,)),
         "kernel_1": box(uniform(keys[3], (h, width), h), (None, None)),
         "bias_1": box(uniform(keys[4], (width,), h), (None,))}
  return {"embedding": box(jax.random.normal(keys[0], (n, h)), (None, EMBED)), "mlp": mlp}


def table(adapter: Mapping[str, Any]) -> jax.Array:
  """peft's prefix table [virtual, layers*2*hidden] (the MLP's output when reparameterised)."""
  x = adapter["embedding"]
  if "mlp" not in adapter:
    return x
  mlp = adapter["mlp"]
  return jnp.tanh(x @ mlp["kernel_0"] + mlp["bias_0"]) @ mlp["kernel_1"] + mlp["bias_1"]


def hooks(adapter: Mapping[str, Any], settings: Any, dims: EncoderDims) -> dict[str, Any]:
  """{'prefix': [layers, virtual, 2 (key, value), heads, head_dim]}."""
  del settings
  rows = table(adapter)  # [virtual, layers * 2 * hidden]
  prefix = rows.reshape(rows.shape[0], dims.layers, 2, dims.heads, dims.head_dim)
  return {PEFT_PREFIX: jnp.swapaxes(prefix, 0, 1)}

