"""Optax optimiser and learning-rate schedule built from the `optim` config section."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxfm.cpu import adamw as cpu_adamw

# Parameter leaf names that get weight decay; LayerNorm scales and all biases do not.
_DECAYED = ("kernel", "embedding", "qkv_kernel", "out_kernel")


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then linear / cosine decay (or constant) to the end value."""
  peak = optim.peak_learning_rate
  end = peak * optim.end_learning_rate_factor
  warmup = optax.linear_schedule(0.0, peak, optim.warmup_steps)
  decay_steps = max(total_steps - optim.warmup_steps, 1)
  if optim.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif optim.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=optim.end_learning_rate_factor)
  else:
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([warmup, decay], [optim.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for matrices and embeddings, False for LayerNorm parameters and biases."""
  def decays(path, _):
    return getattr(path[-1], "key", None) in _DECAYED
  return jax.tree_util.tree_map_with_path(decays, params)


def _keys(path: tuple[Any, ...]) -> list[str]:
  return [str(getattr(p, "key", "")) for p in path]


def layer_lr_scales(tree: Any, decay: float) -> Any:
  """Learning-rate multiplier per parameter under layer-wise decay (ELECTRA's rule).

  With L layers, layer i (0 = bottom) gets decay^(L - i), the embeddings decay^(L + 1),
  the pooler and task heads 1. Scanned layers (the bottom S, stacked on axis 0) get a
  [S, 1, ...] array.
  """
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  stacked = [leaf.shape[0] for path, leaf in leaves if "layers" in _keys(path)]
  num_layers = (stacked[0] if stacked else 0) + len(
      {k for path, _ in leaves for k in _keys(path) if k.startswith("layer_")})

  def scale(path, leaf):
    keys = _keys(path)
    if "encoder" not in keys:
      return 1.0
    if "embeddings" in keys:
      return decay ** (num_layers + 1)
    if "layers" in keys:
      depth = decay ** (num_layers - jnp.arange(leaf.shape[0], dtype=jnp.float32))
      return depth.reshape((leaf.shape[0],) + (1,) * (leaf.ndim - 1))
    layer = [int(k[len("layer_"):]) for k in keys if k.startswith("layer_")]
    return decay ** (num_layers - layer[0]) if layer else 1.0
  return jax.tree_util.tree_map_with_path(scale, tree)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update (so its learning rate and weight decay) by `layer_lr_scales`."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(jnp.multiply, updates, layer_lr_scales(updates, decay)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def applied_if(tx: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`tx` with the train step's extra `update` arguments: `apply` (False on a skipped step:
  zero updates, state unchanged) and `grad_norm` (unused here; the CPU AdamW folds its clip
  factor from it)."""

  def update(grads: Any, state: Any, params: Any = None, *, grad_norm: jax.Array,
             apply: jax.Array) -> tuple[Any, Any]:
    del grad_norm
    updates, new_state = tx.update(grads, state, params)
    return (jax.tree.map(lambda u: jnp.where(apply, u, jnp.zeros_like(u)), updates),
            jax.tree.map(lambda new, old: jnp.where(apply, new, old), new_state, state))

  return optax.GradientTransformationExtraArgs(tx.init, update)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int, fused: bool = False
                   ) -> optax.GradientTransformationExtraArgs:
  """optax's AdamW or LAMB with decoupled weight decay (masked), optional global-norm clipping
  and optional layer-wise learning-rate decay (`optim.layer_decay` < 1, fine-tuning configs).

  The chain is clip -> adamw|lamb -> layer decay, behind `applied_if`. `fused` (CPU runs)
  computes AdamW's update in `jaxfm.cpu.adamw`'s one pass per array, on the same state.
  """
  schedule = learning_rate_schedule(optim, total_steps)
  kwargs = dict(learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                weight_decay=optim.weight_decay, mask=weight_decay_mask)
  parts = [optax.adamw(**kwargs) if optim.name == "adamw" else optax.lamb(**kwargs)]
  if optim.clip_norm > 0:
    parts.insert(0, optax.clip_by_global_norm(optim.clip_norm))
  layer_decay = optim.get("layer_decay", 1.0)
  if layer_decay < 1.0:
    parts.append(scale_by_layer_decay(layer_decay))
  chain = parts[0] if len(parts) == 1 else optax.chain(*parts)
  if not (fused and optim.name == "adamw"):
    return applied_if(chain)
  return cpu_adamw.fused_adamw(
      chain, schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
      weight_decay=optim.weight_decay, decay_mask=weight_decay_mask, clip_norm=optim.clip_norm,
      update_scales=(lambda p: layer_lr_scales(p, layer_decay)) if layer_decay < 1.0 else None)
