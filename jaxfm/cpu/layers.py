"""The encoder's XLA:CPU paths: token-flattened GEMMs and a layer-by-layer backward order.

Both compute the plain path's values (`tests/test_cpu_paths.py`); they change only how XLA:CPU
schedules and lays out the work. `BertConfig.cpu_paths` switches them on.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def matmul_over_tokens(x: Array, kernel: Array, contracting: int = 1, **dot_kwargs) -> Array:
  """x [*tokens, *features] · kernel [*features, *out] -> [*tokens, *out]: x's last
  `contracting` axes with kernel's first, as one 2-D matmul over the flattened token axes.

  The values are `jnp.tensordot`'s; the point is the weight gradient. For a 3-D x it contracts
  two axes (batch and length), which XLA:CPU computes through transposed copies of the output
  gradient; in 2-D it is one GEMM with a transposed operand. Merged axes keep the sharding of
  their first (major) axis: batch leads the token axes, and a kernel sharded on an output or
  feature axis must have that axis first among them, or GSPMD gathers the kernel whole.
  """
  tokens, features = x.shape[:x.ndim - contracting], x.shape[x.ndim - contracting:]
  size = math.prod(features)
  y = jnp.matmul(x.reshape(-1, size), kernel.reshape(size, -1), **dot_kwargs)  # [tokens, out]
  return y.reshape(*tokens, *kernel.shape[contracting:])


def dense_dot_general(lhs: Array, rhs: Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> Array:
  """`lax.dot_general` as `nn.Dense` calls it ([..., in] · [in, out]), by `matmul_over_tokens`."""
  if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
    raise ValueError(f"expected nn.Dense's contraction, got {dimension_numbers}")
  return matmul_over_tokens(lhs, rhs, precision=precision,
                            preferred_element_type=preferred_element_type)


def call_with_layerwise_grads(layer: nn.Module, x: Array, mask: Array, deterministic: bool,
                              positions: Array | None) -> Array:
  """`layer(x, mask, deterministic, positions)[0]` whose backward pass computes the layer's
  parameter gradients before it hands the gradient of `x` on to the layer below.

  For remat'd layers. The gradient of `x` is made to depend on them (NaN where one is not
  finite; the train step skips such a step anyway). Left alone, XLA's CPU memory scheduler
  computes every weight gradient at the very end of the backward pass, so each layer's output
  gradient and recomputed activations stay alive until then and remat saves little.
  `jax.lax.optimization_barrier` cannot express this order: XLA:CPU removes barriers before it
  schedules.

  Barriers being gone, under remat=full the recomputation starts from the saved input plus
  0 * an element of the output gradient: the same numbers, but a value XLA's CSE cannot merge
  with the forward pass's input, which it otherwise does, folding the recomputed projections
  and attention scores into the forward pass's and keeping them alive through the backward
  pass. The other policies save activations of the input's shape too and gain nothing from it.
  """
  offset_input = layer.config.remat_policy == "full"  # the input: its only residual of x's shape

  def call(module: nn.Module, x: Array, mask: Array, positions: Array | None) -> Array:
    return module(x, mask, deterministic, positions)[0]

  def forward(module: nn.Module, x: Array, mask: Array, positions: Array | None):
    return nn.vjp(call, module, x, mask, positions)

  def backward(vjp_fn, y_grad: Array):
    zero = jnp.zeros((), y_grad.dtype) * y_grad.ravel()[0]  # 0, or NaN if y_grad is not finite
    residuals, structure = jax.tree_util.tree_flatten(vjp_fn)
    residuals = [r + zero.astype(r.dtype) if offset_input and r.shape == x.shape
                 and jnp.issubdtype(r.dtype, jnp.floating) else r for r in residuals]
    params_grad, x_grad, *other_grads = jax.tree_util.tree_unflatten(structure, residuals)(y_grad)
    finite = jnp.stack([jnp.isfinite(g).all() for g in jax.tree_util.tree_leaves(params_grad)])
    return params_grad, jnp.where(finite.all(), x_grad, jnp.nan), *other_grads

  return nn.custom_vjp(call, forward_fn=forward, backward_fn=backward)(layer, x, mask, positions)
