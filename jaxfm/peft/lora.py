"""LoRA (Hu et al., 2021): W + scale · A·B on chosen projections, with A [in, r] and B [r, out].

As huggingface/peft defines it: scale = alpha / r (alpha / sqrt(r) with rsLoRA), A drawn
kaiming-uniform (U(±1/sqrt(fan_in)), torch's default for a Linear), B zeros, so training starts
at the base model.

Why the update is folded into the kernel inside the loss, not added on the activations
(x·A·B beside x·W): jaxfm's query, key and value share one fused `qkv_kernel`, a raw parameter
of `SelfAttention`, and the attention output is a raw `out_kernel`; no `nn.Dense` call
exists there for `nn.intercept_methods` to wrap. Folding works for every target without model
code and makes the merged model the very function that was trained. Its costs: a full-size
gradient of each adapted kernel is formed in the backward pass (then contracted to A and B),
and dropout on the LoRA input cannot be expressed, so `peft.dropout` must be 0. The activation
form needs a model hook: the projections as interceptable methods (see the module docstring
of `jaxfm.peft`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfm.peft.sites import Site, boxed_like, logical_names


def scale(settings: Any) -> float:
  """peft's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  return settings.alpha / (math.sqrt(settings.rank) if settings.rslora else settings.rank)


def init(site: Site, kernel: Any, rng: jax.Array, settings: Any) -> dict[str, Any]:
  """{'lora_a': [*layers, *in, r], 'lora_b': [*layers, r, *out]}, on the kernel's logical axes
  (its input axes for A, its output axes for B; the rank axis replicated)."""
  lead, ins, outs = site.split_shape(nn.meta.unbox(kernel).shape)
  r = settings.rank
  bound = 1.0 / math.sqrt(math.prod(ins))
  a = jax.random.uniform(rng, (*lead, *ins, r), jnp.float32, -bound, bound)
  b = jnp.zeros((*lead, r, *outs), jnp.float32)
  names = logical_names(kernel)
  a_names = b_names = None
  if names is not None:
    n_lead, n_in = len(lead), len(ins)
    a_names = (*names[:n_lead + n_in], None)
    b_names = (*names[:n_lead], None, *names[len(names) - len(outs):])
  return {"lora_a": boxed_like(kernel, a, a_names), "lora_b": boxed_like(kernel, b, b_names)}


def delta(site: Site, a: jax.Array, b: jax.Array, factor: float) -> jax.Array:
  """factor · A·B: [*layers, *in, r] x [*layers, r, *out] -> [*layers, *in, *out]."""
  lead, ins, r = a.shape[:site.lead], a.shape[site.lead:-1], a.shape[-1]
  outs = b.shape[site.lead + 1:]
  product = jnp.matmul(a.reshape(*lead, math.prod(ins), r), b.reshape(*lead, r, math.prod(outs)))
  return (factor * product).reshape(*lead, *ins, *outs)


def fold(site: Site, flat: dict[str, Any], adapter: dict[str, jax.Array], settings: Any) -> None:
  """Adds the site's update to its kernel slice in `flat` (a flattened param tree), in place."""
  kernel = flat[site.kernel]
  update = delta(site, adapter["lora_a"], adapter["lora_b"], scale(settings))
  flat[site.kernel] = kernel.at[site.part_index()].add(update.astype(kernel.dtype))
