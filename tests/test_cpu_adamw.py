"""jaxfm.cpu.adamw: the fused AdamW equals optax's clip -> adamw -> layer-decay chain on that
chain's own state, skips bitwise, and compiles without copies of the moments (why it exists)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfm.config import finetune_defaults
from jaxfm.cpu import adamw
from jaxfm.train import optim

# Scanned-layer shapes (stacked on axis 0) so layer decay gives [L, 1, ...] scales.
SHAPES = {"encoder": {"layers": {"dense": {"kernel": (3, 6, 5), "bias": (3, 5)},
                                 "norm": {"scale": (3, 5)}},
                      "embeddings": {"embedding": (11, 6)}},
          "classifier": {"kernel": (6, 2), "bias": (2,)}}


def _tree(rng: np.random.Generator, scale: float = 1.0):
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * scale),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def _optim(**overrides):
  cfg = finetune_defaults().optim
  cfg.update(peak_learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, **overrides)
  return cfg


def _optax_chain(cfg, total):
  parts = [optax.adamw(optim.learning_rate_schedule(cfg, total), cfg.b1, cfg.b2, cfg.eps,
                       weight_decay=cfg.weight_decay, mask=optim.weight_decay_mask)]
  if cfg.clip_norm:
    parts.insert(0, optax.clip_by_global_norm(cfg.clip_norm))
  if cfg.layer_decay < 1:
    parts.append(optim.scale_by_layer_decay(cfg.layer_decay))
  return parts[0] if len(parts) == 1 else optax.chain(*parts)


def _optax_step(chain):
  """The chain plus the select on skipped steps that the train step used to make."""
  def step(params, state, grads, apply):
    updates, new = chain.update(grads, state, params)
    keep = lambda a, b: jax.tree.map(lambda x, y: jnp.where(apply, x, y), a, b)
    return keep(optax.apply_updates(params, updates), params), keep(new, state)
  return step


def _fused_step(tx):
  def step(params, state, grads, apply):
    updates, new = tx.update(grads, state, params, grad_norm=optax.tree.norm(grads), apply=apply)
    return optax.apply_updates(params, updates), new
  return step


@pytest.mark.parametrize("overrides", [dict(clip_norm=1.0), dict(clip_norm=0.0),
                                       dict(clip_norm=0.5, layer_decay=0.8)],
                         ids=["clip", "no_clip", "clip_layer_decay"])
def test_fused_update_equals_the_optax_chain(overrides):
  cfg, total = _optim(**overrides), 6
  tx, chain = optim.make_optimizer(cfg, total, fused=True), _optax_chain(cfg, total)
  rng = np.random.default_rng(0)
  params = _tree(rng)
  state = tx.init(params)
  assert jax.tree.structure(state) == jax.tree.structure(chain.init(params))  # checkpoints restore
  fused = optax_side = (params, state)
  for k in range(total):
    grads = _tree(rng, scale=3.0 if k % 2 else 0.1)  # clipping on and off
    apply = jnp.array(k != 3)  # one skipped step in the middle
    fused = jax.jit(_fused_step(tx))(*fused, grads, apply)
    optax_side = jax.jit(_optax_step(chain))(*optax_side, grads, apply)
  assert int(jax.tree.leaves(fused[1])[0]) == total - 1  # Adam's count: the skip is not counted
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(optax_side)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name, fused", [("adamw", True), ("adamw", False), ("lamb", False)])
def test_a_step_not_applied_keeps_params_and_state_bitwise_even_with_nan_grads(name, fused):
  tx = optim.make_optimizer(_optim(name=name, clip_norm=1.0), 10, fused=fused)
  rng = np.random.default_rng(1)
  params = _tree(rng)
  state = tx.init(params)  # count 0: Adam's bias correction would divide by zero
  grads = jax.tree.map(lambda g: g.at[0].set(jnp.nan), _tree(rng))
  step = _fused_step(tx)
  new_params, new_state = jax.jit(step)(params, state, grads, jnp.array(False))
  for a, b in zip(jax.tree.leaves((params, state)), jax.tree.leaves((new_params, new_state))):
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_the_compiled_update_copies_no_array():
  """optax's chain plus the select made XLA:CPU copy both moments of every parameter."""
  tx = optim.make_optimizer(_optim(clip_norm=1.0), 10, fused=True)
  params = _tree(np.random.default_rng(2))
  state = tx.init(params)
  text = jax.jit(_fused_step(tx), donate_argnums=(0, 1)).lower(
      params, state, params, jnp.array(True)).compile().as_text()
  copies = [line for line in text.splitlines() if " copy(" in line and "f32[" in line]
  assert not copies, "\n".join(copies)


def test_fused_update_rejects_a_state_without_adam():
  tx = adamw.fused_adamw(optax.sgd(0.1), optax.constant_schedule(0.1), b1=0.9, b2=0.999,
                         eps=1e-6, weight_decay=0.0, decay_mask=optim.weight_decay_mask,
                         clip_norm=0.0)
  params = _tree(np.random.default_rng(3))
  with pytest.raises(ValueError, match="expected one ScaleByAdamState"):
    tx.update(params, tx.init(params), params, grad_norm=jnp.array(1.0), apply=jnp.array(True))
