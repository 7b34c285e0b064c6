"""LoRA (Hu et al., 2021): W + scale · A·B on chosen projections, with A [in, r] and B [r, out].

As huggingface/peft defines it: scale = alpha / r (alpha / sqrt(r) with rsLoRA), A drawn
kaiming-uniform (U(±1/sqrt(fan_in)), torch's default for a Linear), B zeros, so training starts
at the base model.

Two forms compute the same function. Folded: W + scale · A·B inside the loss, then x·(that);
with activations: x·W + scale · dropout(x)·A·B through the encoder's `PEFT_LORA` hook, placed
where each projection is computed (query, key and value share one fused `qkv_kernel` and the
attention output is a raw `out_kernel`, so no `nn.Dense` call exists there to intercept). Only
the second has room for peft's `lora_dropout`, so training takes it exactly when
`peft.dropout` > 0; export (`--to_hf`, the merged model) always folds.

Why not the activation form always: for MiniLM-L6 (hidden 384, 6 layers), batch 32 x seq 128,
r = 8, the train step compiled both ways for `jaxfm.aot`'s v5e 2x2 devices (bfloat16) does
without the full-size kernel gradients (FLOPs -9% on query,value, -25% on all-linear) but takes
more temporary memory (+8.7 MiB per chip on query,value, +6.9 MiB on all-linear: the [tokens, r]
products and the re-stacked q/k/v); on XLA:CPU, where jaxfm's fine-tuning mostly runs, its step
is slower (2.51 s against 2.22 s): more small matmuls, and a hooked stack forgoes the
layer-by-layer backward order (`jaxfm.cpu`). Folded training also makes the merged model the
very function that was trained and allows unevenly pruned heads, which the stacked hook cannot.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfm.models.encoder import LORA_DROPOUT, PEFT_LORA
from jaxfm.peft.sites import EncoderDims, Site, boxed_like, logical_names, scope_order
from jaxfm.trees import flatten


def scale(settings: Any) -> float:
  """peft's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA."""
  return settings.alpha / (math.sqrt(settings.rank) if settings.rslora else settings.rank)


def on_activations(settings: Any) -> bool:
  """Whether training runs LoRA beside the projections (the hook) rather than folded: exactly
  when it has dropout on its input."""
  return settings.method == "lora" and settings.dropout > 0


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


def hooks(adapter: Mapping[str, Any], settings: Any, dims: EncoderDims) -> dict[str, Any]:
  """The encoder's `PEFT_LORA` input: per target, lora_a [layers, *in, r] and scale · lora_b
  [layers, r, *out], every layer stacked bottom first; the dropout rate [layers] when > 0.

  Raises:
    ValueError: a target's layers differ in shape (heads pruned unevenly): no stacked form.
  """
  factor, stacked = scale(settings), {}
  flat = flatten(adapter)
  for key in sorted(flat, key=lambda k: scope_order(k.rsplit("/", 2)[0])):
    scope, target, leaf = key.rsplit("/", 2)
    value = flat[key] * factor if leaf == "lora_b" else flat[key]
    stacked.setdefault(target, {}).setdefault(leaf, []).append(
        value if scope.endswith("/layers") else value[None])
  lora = {}
  for target, leaves in stacked.items():
    for leaf, values in leaves.items():
      if len({v.shape[1:] for v in values}) > 1:
        raise ValueError(f"LoRA on {target}: its layers' {leaf} shapes differ "
                         f"{sorted({v.shape[1:] for v in values})} (unevenly pruned heads)")
    lora[target] = {leaf: jnp.concatenate(values) for leaf, values in leaves.items()}
  if settings.dropout:
    lora[LORA_DROPOUT] = jnp.full((dims.layers,), settings.dropout, jnp.float32)
  return {PEFT_LORA: lora}
