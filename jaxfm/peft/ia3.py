"""IA³ (Liu et al., 2022): learned vectors that rescale activations, initialised to ones.

As huggingface/peft defines it: for key and value (and any projection not listed as
feed-forward) the projection's output is scaled, bias included: (x·W + b) ⊙ l; for the
down projections (`output`, `attention.output`, peft's `feedforward_modules`) the input is:
(x ⊙ l)·W + b, which for `output` scales the FFN's intermediate activations. Both fold
exactly into the kernel (columns or rows) and the bias, so the update is applied there.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfm.peft.sites import Site, boxed_like, logical_names

# Targets whose inputs IA³ scales (peft's `feedforward_modules`); the others' outputs.
INPUT_SCALED = ("attention.output", "output")


def scales_input(site: Site) -> bool:
  return site.target.name in INPUT_SCALED


def init(site: Site, kernel: Any, rng: jax.Array, settings: Any) -> dict[str, Any]:
  """{'scale': ones [*layers, *in]} for input-scaled targets, else [*layers, *out]."""
  del rng, settings
  lead, ins, outs = site.split_shape(nn.meta.unbox(kernel).shape)
  names = logical_names(kernel)
  if scales_input(site):
    shape = (*lead, *ins)
    axes = None if names is None else names[:len(lead) + len(ins)]
  else:
    shape = (*lead, *outs)
    axes = None if names is None else (*names[:len(lead)], *names[len(names) - len(outs):])
  return {"scale": boxed_like(kernel, jnp.ones(shape, jnp.float32), axes)}


def fold(site: Site, flat: dict[str, Any], adapter: dict[str, jax.Array], settings: Any) -> None:
  """Multiplies the site's kernel rows (input-scaled) or columns and bias slice by the scale."""
  del settings
  scale = adapter["scale"]
  kernel = flat[site.kernel]
  lead, ins, outs = site.split_shape(kernel.shape)
  if scales_input(site):  # [*layers, *in] -> over the kernel's output axes
    flat[site.kernel] = kernel * scale.reshape(*lead, *ins, *(1,) * len(outs)).astype(kernel.dtype)
    return
  columns = scale.reshape(*lead, *(1,) * len(ins), *outs).astype(kernel.dtype)
  flat[site.kernel] = kernel.at[site.part_index()].multiply(columns)
  bias = flat[site.bias]
  flat[site.bias] = bias.at[site.bias_index()].multiply(scale.astype(bias.dtype))
