"""Pure train and eval steps, built from a task's loss function.

A loss function maps `(params, batch, dropout_rng | None)` to
`(loss_sum, sums)` where `sums` is a dict of per-batch sums that must include
`loss_sum` and `weight` (the number of weighted targets). Steps divide by the
total weight of the *whole* batch, so gradient accumulation computes the same
update as one big batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from jaxfm.train.state import TrainState

Batch = dict[str, jax.Array]
Sums = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array | None], tuple[jax.Array, Sums]]
StepFn = Callable[..., tuple[TrainState, dict[str, jax.Array]]]
# (trainable params, frozen params) -> the model's params (`jaxfm.peft.Plan.combine`).
Combine = Callable[[Any, Any], Any]
# trainable params -> a scalar added to the loss per weighted target (`jaxfm.peft.Plan.penalty`).
Penalty = Callable[[Any], jax.Array]


def _model_loss(loss_fn: LossFn, combine: Combine | None, frozen: Any,
                penalty: Penalty | None = None) -> LossFn:
  """`loss_fn` of the trainable params: with `combine`, the frozen ones are folded in; with
  `penalty`, penalty · weight is added to the differentiated loss sum (so the step's mean
  loss gains the penalty once; the reported `sums` stay the task's)."""
  if combine is None and penalty is None:
    return loss_fn

  def loss(params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, Sums]:
    loss_sum, sums = loss_fn(params if combine is None else combine(params, frozen), batch, rng)
    if penalty is not None:
      loss_sum = loss_sum + penalty(params) * sums["weight"]
    return loss_sum, sums
  return loss


def _split_micro_batches(batch: Batch, count: int) -> Batch:
  """[batch, ...] -> [count, batch // count, ...], keeping each device's rows local."""
  def split(x):
    micro = x.reshape(x.shape[0] // count, count, *x.shape[1:])
    return jnp.moveaxis(micro, 1, 0)
  return jax.tree.map(split, batch)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformationExtraArgs,
                    schedule: optax.Schedule, grad_accum_steps: int = 1,
                    skip_nonfinite: bool = True, combine: Combine | None = None,
                    penalty: Penalty | None = None) -> StepFn:
  """Returns `train_step(state, batch, frozen=None) -> (state, metrics)`, pure and jittable.

  `tx` is an `optim.make_optimizer` optimiser: its `update` takes the gradients' global norm
  and `apply` (False when `skip_nonfinite` and the step is not finite: state kept). With
  `combine` (parameter-efficient fine-tuning) `state.params` is the trainable tree and the
  model's params are `combine(state.params, frozen)`: gradients and optimizer state exist for
  the trainable tree only. `penalty` (a function of `state.params`) is added to the mean loss
  that is differentiated.
  """
  def train_step(state: TrainState, batch: Batch, frozen: Any = None
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    grad_fn = jax.value_and_grad(_model_loss(loss_fn, combine, frozen, penalty), has_aux=True)

    def micro_step(params: Any, batch: Batch, rng: jax.Array) -> tuple[Any, Sums]:
      (_, sums), grads = grad_fn(params, batch, rng)
      return grads, sums

    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      grads, sums = micro_step(state.params, batch, rng)
    else:
      micro_batches = _split_micro_batches(batch, grad_accum_steps)
      first = jax.tree.map(lambda x: x[0], micro_batches)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           jax.eval_shape(micro_step, state.params, first, rng))

      def accumulate(carry, xs):
        index, micro = xs
        out = micro_step(state.params, micro, jax.random.fold_in(rng, index))
        return jax.tree.map(jnp.add, carry, out), None

      (grads, sums), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(grad_accum_steps), micro_batches))
    weight = jnp.maximum(sums["weight"], 1.0)
    # The norm of the sums, and a multiply: XLA then fuses the division into the optimiser's
    # passes instead of writing the divided gradients out (a divide it would not duplicate).
    grad_norm = optax.tree.norm(grads) / weight
    inverse_weight = 1.0 / weight
    grads = jax.tree.map(lambda g: g * inverse_weight, grads)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(sums["loss_sum"])
    updates, opt_state = tx.update(grads, state.opt_state, state.params, grad_norm=grad_norm,
                                   apply=finite if skip_nonfinite else jnp.array(True))
    params = optax.apply_updates(state.params, updates)
    nonfinite = (~finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped_steps=state.skipped_steps + nonfinite * int(skip_nonfinite),
        consecutive_nonfinite=(state.consecutive_nonfinite + 1) * nonfinite)
    metrics = {k: v for k, v in sums.items()}
    metrics.update(grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite)
    return new_state, metrics

  return train_step


def make_eval_step(loss_fn: LossFn, predict_fn: Callable[[Any, Batch], Sums] | None = None,
                   combine: Combine | None = None) -> Callable[..., tuple[Sums, Sums]]:
  """Returns `eval_step(params, batch, frozen=None) -> (sums, outputs)`, deterministic (no
  dropout); `combine` as for `make_train_step`.

  `outputs` are `predict_fn`'s per-example arrays ({} without one); XLA computes the forward
  pass that the loss and the predictions share once.
  """
  def eval_step(params: Any, batch: Batch, frozen: Any = None) -> tuple[Sums, Sums]:
    if combine is not None:
      params = combine(params, frozen)
    sums = loss_fn(params, batch, None)[1]
    return sums, ({} if predict_fn is None else predict_fn(params, batch))
  return eval_step
