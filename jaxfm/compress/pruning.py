"""Structured pruning of a fine-tuned encoder: whole attention heads and FFN neurons ranked by
importance and sliced out of the weights, leaving a smaller model (`BertConfig.pruned_heads`,
a smaller `intermediate_size`).

**Importance.** `gradient` (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"):
a gate g = 1 on each head's output and on each FFN neuron; a head's (neuron's) score is
|dL/dg| of the task loss, summed over a few batches. Gating head h scales its slice
`out_kernel[h]` [head_dim, hidden] of the attention output projection, and gating neuron j the
row `output/kernel[j]` [hidden]: so dL/dg = <W, dL/dW> over that slice, read from the ordinary
parameter gradient, with no gate in the model. `magnitude`: the L2 norm of every weight that
belongs to the head (its query, key, value and output slices) or to the neuron (its
`intermediate` column and `output` row). Head scores are divided by their layer's L2 norm (as
Michel et al. do) and ranked across layers; neurons are ranked within their layer.

**Pruning.** `heads_share` of all heads go, the lowest first, never a layer's last head;
`ffn_share` of each layer's neurons go (the same count per layer: HF's config has one
`intermediate_size`). The kept heads and neurons keep their order and their weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxfm.models import BertConfig
from jaxfm.trees import flatten, unflatten

_LAYER = "encoder/layer_{}"


@dataclasses.dataclass(frozen=True)
class Scores:
  """Importance per layer: `heads[i]` [layer i's heads] (in their current order), `neurons`
  [layers, intermediate]."""

  heads: tuple[np.ndarray, ...]
  neurons: np.ndarray


@dataclasses.dataclass(frozen=True)
class Plan:
  """What stays: per layer, the current indices of the kept heads and kept FFN neurons
  (ascending)."""

  heads: tuple[tuple[int, ...], ...]
  neurons: tuple[np.ndarray, ...]


def _check_share(field: str, share: float) -> None:
  if not 0.0 <= share < 1.0:
    raise ValueError(f"{field}={share}: must be in [0, 1) (the share of units removed)")


def _layer(flat: dict[str, Any], config: BertConfig, i: int) -> dict[str, Any]:
  prefix = _LAYER.format(i) + "/"
  if prefix + "attention/out_kernel" not in flat:
    raise ValueError(f"params have no {prefix}attention/out_kernel: pruning takes the unscanned "
                     f"params of a {config.num_layers}-layer encoder")
  return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def gradient_scores(loss_fn: Callable[..., tuple[jax.Array, Any]], params: Any,
                    config: BertConfig, batches: Iterable[dict[str, np.ndarray]]) -> Scores:
  """|dL/dg| per head and neuron (see the module docstring) summed over `batches`, for the task
  loss `loss_fn(params, batch, rng)` (deterministic: rng None) of unscanned `params`."""
  def gate_grads(p: Any, batch: dict[str, jax.Array]) -> tuple[list[jax.Array], list[jax.Array]]:
    grads = flatten(jax.grad(lambda q: loss_fn(q, batch, None)[0])(p))
    weights = flatten(p)
    heads, neurons = [], []
    for i in range(config.num_layers):
      out = f"{_LAYER.format(i)}/attention/out_kernel"  # [heads, head_dim, hidden]
      ffn = f"{_LAYER.format(i)}/output/kernel"  # [intermediate, hidden]
      heads.append(jnp.abs(jnp.sum(weights[out] * grads[out], axis=(1, 2))))
      neurons.append(jnp.abs(jnp.sum(weights[ffn] * grads[ffn], axis=1)))
    return heads, neurons

  step = jax.jit(gate_grads)
  heads = [np.zeros(config.layer_heads(i)) for i in range(config.num_layers)]
  neurons = np.zeros((config.num_layers, config.intermediate_size))
  seen = 0
  for batch in batches:
    h, n = jax.device_get(step(params, batch))
    heads = [a + b for a, b in zip(heads, h)]
    neurons += np.stack(n)
    seen += 1
  if not seen:
    raise ValueError("gradient importance needs at least one batch of training data")
  return Scores(tuple(heads), neurons)


def magnitude_scores(params: Any, config: BertConfig) -> Scores:
  """The L2 norm of each head's and each neuron's weights (see the module docstring)."""
  flat = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
  heads, neurons = [], []
  for i in range(config.num_layers):
    layer = _layer(flat, config, i)
    qkv = layer["attention/qkv_kernel"]  # [hidden, 3, heads, head_dim]
    out = layer["attention/out_kernel"]  # [heads, head_dim, hidden]
    heads.append(np.sqrt(np.sum(qkv ** 2, axis=(0, 1, 3)) + np.sum(out ** 2, axis=(1, 2))))
    neurons.append(np.sqrt(np.sum(layer["intermediate/kernel"] ** 2, axis=0)
                           + np.sum(layer["output/kernel"] ** 2, axis=1)))
  return Scores(tuple(heads), np.stack(neurons))


def plan(config: BertConfig, scores: Scores, heads_share: float, ffn_share: float) -> Plan:
  """The heads and neurons to keep for the shares removed (see the module docstring).

  Raises:
    ValueError: a share outside [0, 1), or one that would leave a layer with no head or no
      neuron.
  """
  _check_share("prune.heads_share", heads_share)
  _check_share("prune.ffn_share", ffn_share)
  counts = [config.layer_heads(i) for i in range(config.num_layers)]
  total = sum(counts)
  drop = round(heads_share * total)
  if drop > total - config.num_layers:
    raise ValueError(f"prune.heads_share={heads_share} removes {drop} of {total} heads; at "
                     f"most {total - config.num_layers} can go (each layer keeps one)")
  normalised = [s / (np.linalg.norm(s) + 1e-20) for s in scores.heads]
  ranked = sorted((float(s), i, h) for i, layer in enumerate(normalised)
                  for h, s in enumerate(layer))
  left, dropped, removed = list(counts), [set() for _ in counts], 0
  for _, i, h in ranked:
    if removed == drop:
      break
    if left[i] > 1:  # a layer's last head stays
      dropped[i].add(h)
      left[i] -= 1
      removed += 1
  neurons = config.intermediate_size - round(ffn_share * config.intermediate_size)
  if neurons < 1:
    raise ValueError(f"prune.ffn_share={ffn_share} removes every one of the "
                     f"{config.intermediate_size} FFN neurons")
  kept_neurons = tuple(np.sort(np.argsort(-layer, kind="stable")[:neurons])
                       for layer in scores.neurons)
  kept_heads = tuple(tuple(h for h in range(n) if h not in d) for n, d in zip(counts, dropped))
  return Plan(kept_heads, kept_neurons)


def apply(params: Any, config: BertConfig, kept: Plan) -> tuple[Any, BertConfig]:
  """Unscanned `params` sliced to the kept heads and neurons, and the smaller model's config
  (its `pruned_heads` in original head indices, also across repeated pruning)."""
  flat = dict(flatten(params))
  for i in range(config.num_layers):
    path = _LAYER.format(i)
    heads, neurons = np.asarray(kept.heads[i], np.int64), kept.neurons[i]
    _layer(flat, config, i)  # the unscanned layer is there, else a clear error
    for name, axis in (("attention/qkv_kernel", 2), ("attention/qkv_bias", 1),
                       ("attention/out_kernel", 0)):
      flat[f"{path}/{name}"] = np.take(np.asarray(flat[f"{path}/{name}"]), heads, axis=axis)
    for name, axis in (("intermediate/kernel", 1), ("intermediate/bias", 0),
                       ("output/kernel", 0)):
      flat[f"{path}/{name}"] = np.take(np.asarray(flat[f"{path}/{name}"]), neurons, axis=axis)
  original = [config.kept_heads(i) for i in range(config.num_layers)]
  pruned = tuple(tuple(h for h in range(config.num_heads)
                       if h not in {original[i][k] for k in kept.heads[i]})
                 for i in range(config.num_layers))
  sizes = {len(n) for n in kept.neurons}
  if len(sizes) != 1:
    raise ValueError(f"every layer must keep as many FFN neurons; the plan keeps {sorted(sizes)}")
  return unflatten(flat), config.replace(pruned_heads=pruned, intermediate_size=sizes.pop())


def count_params(params: Any) -> int:
  """How many numbers `params` holds."""
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))
