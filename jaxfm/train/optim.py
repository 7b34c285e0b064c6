"""Optax optimiser and learning-rate schedule built from the `optim` config section."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW or LAMB with decoupled weight decay (masked) and optional global-norm clipping."""
  schedule = learning_rate_schedule(optim, total_steps)
  kwargs = dict(learning_rate=schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                weight_decay=optim.weight_decay, mask=weight_decay_mask)
  core = optax.adamw(**kwargs) if optim.name == "adamw" else optax.lamb(**kwargs)
  if optim.clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), core)
  return core
