"""Bottleneck adapters: x + up(act(down(x))) inside each layer, down to hidden / reduction_factor.

Houlsby et al. (2019) put one after the attention output and one after the FFN output; Pfeiffer
et al. (2021) only the one after the FFN. Each sits after its sublayer's projection and dropout,
before the residual sum and LayerNorm, and uses the model's activation. The down-projection is
drawn like a torch Linear (U(±1/sqrt(hidden))), the up-projection and biases are zeros, so
training starts at the base model. huggingface/peft has no bottleneck adapters: there is no
peft export.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from jaxfm.models.encoder import EMBED, LAYERS, PEFT_ATTENTION_ADAPTER, PEFT_OUTPUT_ADAPTER
from jaxfm.peft.sites import EncoderDims, boxed_like

PLACES = {"houlsby": (PEFT_ATTENTION_ADAPTER, PEFT_OUTPUT_ADAPTER),
          "pfeiffer": (PEFT_OUTPUT_ADAPTER,)}


def bottleneck_size(hidden: int, reduction_factor: int) -> int:
  return max(1, hidden // reduction_factor)


def init(flat: Mapping[str, Any], rng: jax.Array, settings: Any, text_ids: Any) -> dict[str, Any]:
  """{place: {down_kernel [layers, hidden, b], down_bias [layers, b], up_kernel [layers, b,
  hidden], up_bias [layers, hidden]}} for the method's places."""
  del text_ids
  dims = EncoderDims.of(flat)
  layers, hidden = dims.layers, dims.hidden
  size = bottleneck_size(hidden, settings.reduction_factor)
  bound = 1.0 / math.sqrt(hidden)
  box = lambda value, names: boxed_like(dims.like, value, names)
  adapter = {}
  for index, place in enumerate(PLACES[settings.method]):
    down = jax.random.uniform(jax.random.fold_in(rng, index), (layers, hidden, size),
                              jnp.float32, -bound, bound)
    adapter[place] = {
        "down_kernel": box(down, (LAYERS, EMBED, None)),
        "down_bias": box(jnp.zeros((layers, size), jnp.float32), (LAYERS, None)),
        "up_kernel": box(jnp.zeros((layers, size, hidden), jnp.float32), (LAYERS, None, EMBED)),
        "up_bias": box(jnp.zeros((layers, hidden), jnp.float32), (LAYERS, EMBED))}
  return adapter


def hooks(adapter: Mapping[str, Any], settings: Any, dims: EncoderDims) -> dict[str, Any]:
  del settings, dims
  return dict(adapter)
