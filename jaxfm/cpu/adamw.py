"""AdamW with global-norm clipping and step skipping in one pass per array.

It computes what optax's `clip_by_global_norm -> adamw -> layer decay` chain followed by a
"keep the old state if the step is not applied" select computes, on that chain's own state
(`reference.init`), so checkpoints and state shardings do not change. Why not the chain on
CPU: XLA:CPU has no multi-output fusion, and there the chain materialises the clipped
gradients (the norm's reduction cannot take them fused), and the select re-reads the old
moments after the new ones overwrite them, so XLA copies both moments every step: about twice
the passes over the parameters that the update needs. Here the clip factor is a scalar folded
into the moment updates, the new moments are materialised once (an optimization barrier) and
the parameter update reads them, not the old ones: per array (mu, g) -> mu, (nu, g) -> nu,
(p, mu, nu) -> p.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

_STATES = (optax.ScaleByAdamState, optax.ScaleByScheduleState)


def _only(state: Any, kind: type) -> Any:
  found = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _STATES))
           if isinstance(s, kind)]
  if len(found) != 1:
    raise ValueError(f"expected one {kind.__name__} in the optimiser state, found {len(found)}")
  return found[0]


def _replace(state: Any, adam: optax.ScaleByAdamState,
             schedule: optax.ScaleByScheduleState) -> Any:
  def swap(s):
    if isinstance(s, optax.ScaleByAdamState):
      return adam
    return schedule if isinstance(s, optax.ScaleByScheduleState) else s
  return jax.tree.map(swap, state, is_leaf=lambda x: isinstance(x, _STATES))


def fused_adamw(reference: optax.GradientTransformation, learning_rate: optax.Schedule, *,
                b1: float, b2: float, eps: float, weight_decay: float,
                decay_mask: Callable[[Any], Any], clip_norm: float,
                update_scales: Callable[[Any], Any] | None = None
                ) -> optax.GradientTransformationExtraArgs:
  """`reference`'s AdamW update, fused; `update(grads, state, params, grad_norm=, apply=)`.

  `grad_norm` is the global L2 norm of `grads` (the train step has it already), `apply` a
  bool scalar: False returns zero updates and `state` unchanged. `clip_norm` <= 0 disables
  clipping; `update_scales(params)` gives per-parameter update multipliers (layer decay).
  """

  def update(grads: Any, state: Any, params: Any = None, *, grad_norm: jax.Array,
             apply: jax.Array) -> tuple[Any, Any]:
    adam, schedule = _only(state, optax.ScaleByAdamState), _only(state, optax.ScaleByScheduleState)
    clip = jnp.minimum(1.0, clip_norm / grad_norm) if clip_norm > 0 else 1.0
    mu = jax.tree.map(lambda m, g: jnp.where(apply, b1 * m + (1 - b1) * (g * clip), m),
                      adam.mu, grads)
    nu = jax.tree.map(lambda v, g: jnp.where(apply, b2 * v + (1 - b2) * jnp.square(g * clip), v),
                      adam.nu, grads)
    mu, nu = jax.lax.optimization_barrier((mu, nu))  # the update below reads these, not the old
    count = optax.safe_increment(adam.count)
    step = count.astype(jnp.float32)
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    rate = learning_rate(schedule.count)
    scales = update_scales(params) if update_scales else jax.tree.map(lambda _: 1.0, params)

    def delta(p, m, v, decays, scale):
      u = (m / c1) / (jnp.sqrt(v / c2) + eps) + (weight_decay * p if decays else 0.0)
      return jnp.where(apply, -rate * scale * u, 0.0).astype(p.dtype)

    updates = jax.tree.map(delta, params, mu, nu, decay_mask(params), scales)
    keep = lambda new, old: jnp.where(apply, new, old)
    new_adam = optax.ScaleByAdamState(count=keep(count, adam.count), mu=mu, nu=nu)
    new_schedule = optax.ScaleByScheduleState(
        count=keep(optax.safe_increment(schedule.count), schedule.count))
    return updates, _replace(state, new_adam, new_schedule)

  return optax.GradientTransformationExtraArgs(reference.init, update)

