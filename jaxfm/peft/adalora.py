"""AdaLoRA (Zhang et al., 2023): LoRA in SVD form, W + P·diag(E)·Q · alpha / r, whose ranks are
pruned to a global budget by importance while training.

As huggingface/peft's AdaLoraModel defines it, with r = init_r per site: `lora_a` (Q, the
right singular vectors: [*in, r] here, peft's lora_A [r, in]), `lora_e` (the singular values:
[r], peft's lora_E [r, 1]) and `lora_b` (P: [r, *out], peft's lora_B [out, r]); A and B drawn
N(0, 0.02), E zeros; the update is scaled by alpha / (ranknum + 1e-5) with peft's ranknum, a
constant init_r (pruning zeroes E entries, it does not rescale). Like LoRA the update is
folded into the frozen kernel (see `jaxfm.peft.lora`).

Two parts act beyond the weights, both pure: `penalty` is peft's orthogonality regulariser,
added to the training loss, and `allocator` is peft's `RankAllocator` as an optax wrapper
around the run's optimiser: after each update it smooths the importance of every entry of A,
E and B (EMAs of the sensitivity |w·g| and of its uncertainty), and on peft's cubic budget
schedule zeroes the E entries of the least important triplets. Its state (step, EMAs, the
kept triplets) is part of the optimizer state, so checkpoints and resumes carry it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfm.peft import lora
from jaxfm.peft.sites import Site, boxed_like, logical_names
from jaxfm.trees import flatten, unflatten

INIT_STD = 0.02  # peft's normal init of lora_A and lora_B
RANKNUM_EPS = 1e-5  # peft divides by ranknum + 1e-5
E = "lora_e"


def scale(settings: Any) -> float:
  """peft's scaling / (ranknum + 1e-5), with ranknum = init_r."""
  return settings.alpha / (settings.init_r + RANKNUM_EPS)


def init(site: Site, kernel: Any, rng: jax.Array, settings: Any) -> dict[str, Any]:
  """{'lora_a': [*layers, *in, r], 'lora_e': [*layers, r], 'lora_b': [*layers, r, *out]}, on
  the kernel's logical axes as LoRA's A and B (E only on the layer axes)."""
  lead, ins, outs = site.split_shape(nn.meta.unbox(kernel).shape)
  r = settings.init_r
  a_rng, b_rng = jax.random.split(rng)
  a = INIT_STD * jax.random.normal(a_rng, (*lead, *ins, r), jnp.float32)
  b = INIT_STD * jax.random.normal(b_rng, (*lead, r, *outs), jnp.float32)
  e = jnp.zeros((*lead, r), jnp.float32)
  names = logical_names(kernel)
  a_names = b_names = e_names = None
  if names is not None:
    n_lead, n_in = len(lead), len(ins)
    a_names = (*names[:n_lead + n_in], None)
    b_names = (*names[:n_lead], None, *names[len(names) - len(outs):])
    e_names = (*names[:n_lead], None)
  return {"lora_a": boxed_like(kernel, a, a_names), E: boxed_like(kernel, e, e_names),
          "lora_b": boxed_like(kernel, b, b_names)}


def fold(site: Site, flat: dict[str, Any], adapter: dict[str, jax.Array], settings: Any) -> None:
  """Adds the site's A·diag(E)·B · scale to its kernel slice in `flat`, in place."""
  kernel = flat[site.kernel]
  a, e = adapter["lora_a"], adapter[E]  # [*layers, *in, r], [*layers, r]
  inputs = a.ndim - e.ndim
  scaled = a * e.reshape(*e.shape[:-1], *(1,) * inputs, e.shape[-1])  # A·diag(E)
  update = lora.delta(site, scaled, adapter["lora_b"], scale(settings))
  flat[site.kernel] = kernel.at[site.part_index()].add(update.astype(kernel.dtype))


def _triplets(adapter: Any) -> dict[str, dict[str, jax.Array]]:
  """{site: {'lora_a', 'lora_e', 'lora_b'}} of a (flattenable) adapter tree."""
  flat = flatten(adapter)
  return {k[:-len(E) - 1]: {n: flat[f"{k[:-len(E) - 1]}/{n}"] for n in ("lora_a", E, "lora_b")}
          for k in flat if k.endswith(f"/{E}")}


def _matrices(t: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """A as [*layers, in, r] and B as [*layers, r, out] (input and output axes merged)."""
  lead, r = t[E].shape[:-1], t[E].shape[-1]
  return t["lora_a"].reshape(*lead, -1, r), t["lora_b"].reshape(*lead, r, -1)


def penalty(adapter: Any, settings: Any) -> jax.Array:
  """peft's orthogonality regulariser: orth_reg_weight · the mean over every A and B matrix
  (each layer's its own) of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F (peft's layouts; r x r each)."""
  total, count = jnp.zeros((), jnp.float32), 0
  eye = jnp.eye(settings.init_r, dtype=jnp.float32)
  for t in _triplets(adapter).values():
    a, b = _matrices(t)
    for cov in (jnp.swapaxes(a, -1, -2) @ a, b @ jnp.swapaxes(b, -1, -2)):  # [*layers, r, r]
      total += optax.safe_norm(cov - eye, 0.0, axis=(-2, -1)).sum()
      count += math.prod(cov.shape[:-2])
  return settings.orth_reg_weight * total / max(count, 1)


def budgets(settings: Any, adapter: Any) -> tuple[int, int]:
  """(initial, target) total rank over every A·E·B matrix (each layer's its own)."""
  matrices = sum(math.prod(nn.meta.unbox(t[E]).shape[:-1]) for t in _triplets(adapter).values())
  return matrices * settings.init_r, matrices * settings.target_r


def _budget_drops(init_bgt: int, target_bgt: int, settings: Any, total_steps: int
                  ) -> np.ndarray:
  """[init_bgt - target_bgt] int32: for each budget b from init_bgt - 1 down to target_bgt,
  the first step of the cubic phase whose budget is <= b. The budgets are computed on the host
  in float64 exactly as peft computes them (float32 on the device would round some across an
  integer); a table over budgets, not steps, so its size does not grow with the run."""
  tinit, final = settings.tinit, total_steps - settings.tfinal
  steps = np.arange(tinit + 1, final + 1)
  cubic = np.array([int((init_bgt - target_bgt) * (1 - (step - tinit) / (final - tinit)) ** 3
                        + target_bgt) for step in steps], np.int64)
  levels = np.arange(init_bgt - 1, target_bgt - 1, -1)
  return steps[np.searchsorted(-cubic, -levels)].astype(np.int32)  # cubic ends at target_bgt


def budget_schedule(step: jax.Array, init_bgt: int, target_bgt: int, settings: Any,
                    total_steps: int) -> tuple[jax.Array, jax.Array]:
  """peft's `RankAllocator.budget_schedule`: (the total rank budget at `step`, whether to
  mask to it): the initial budget up to tinit, the target after total_steps - tfinal, a cubic
  decrease between, masking every deltaT steps there."""
  step = jnp.asarray(step, jnp.int32)
  tinit, final = settings.tinit, total_steps - settings.tfinal
  drops = jnp.asarray(_budget_drops(init_bgt, target_bgt, settings, total_steps))
  cubic = init_bgt - (drops <= step[..., None]).sum(-1, dtype=jnp.int32)
  budget = jnp.where(step <= tinit, init_bgt, jnp.where(step > final, target_bgt, cubic))
  mask = (step > tinit) & ((step > final) | (step % settings.deltaT == 0))
  return budget, mask


class AllocatorState(NamedTuple):
  inner: Any  # the wrapped optimiser's state
  count: jax.Array  # int32 []: steps taken (peft's global_step of the next update)
  ipt: Any  # the adapter tree: EMA of the sensitivity |w·g|
  unc: Any  # the adapter tree: EMA of the sensitivity's uncertainty
  keep: Any  # {site: bool [*layers, r]}: the triplets the last allocation kept


def _scores(ipt: Any, unc: Any) -> dict[str, jax.Array]:
  """{site: [*layers, r]}: each triplet's importance, peft's E score + mean A and B scores."""
  scores, uncertainties = {}, _triplets(unc)
  for site, i in _triplets(ipt).items():
    s = {n: i[n] * uncertainties[site][n] for n in i}
    a, b = _matrices(s)
    scores[site] = s[E] + (a.mean(axis=-2) + b.mean(axis=-1))
  return scores


def _smoothed(settings: Any, state: AllocatorState, weights: Any, grads: Any
              ) -> tuple[Any, Any]:
  """peft's `update_ipt`: the EMAs (adapter trees) of the sensitivity |w·g| and of its
  uncertainty |sensitivity - its EMA|."""
  b1, b2 = settings.beta1, settings.beta2
  ipt = jax.tree.map(lambda w, g: jnp.abs(w * g), weights, grads)
  ipt_avg = jax.tree.map(lambda old, i: b1 * old + (1 - b1) * i, state.ipt, ipt)
  unc_avg = jax.tree.map(lambda old, i, avg: b2 * old + (1 - b2) * jnp.abs(i - avg),
                         state.unc, ipt, ipt_avg)
  return ipt_avg, unc_avg


def _kept(scores: dict[str, jax.Array], pruned: jax.Array) -> dict[str, jax.Array]:
  """peft's `mask_to_budget`: keep the triplets scoring above the `pruned`-th lowest score
  (torch.kthvalue's k; all of them at 0)."""
  ranked = jnp.sort(jnp.concatenate([s.reshape(-1) for s in scores.values()]))
  threshold = jnp.where(pruned > 0, ranked[jnp.maximum(pruned - 1, 0)], -jnp.inf)
  return {site: s > threshold for site, s in scores.items()}


def allocator(inner: optax.GradientTransformationExtraArgs, settings: Any, total_steps: int
              ) -> optax.GradientTransformationExtraArgs:
  """`inner` (over the trainable tree {'adapter', 'head'}) followed by peft's rank allocation
  on the adapter (see the module docstring). At the update of step t, as peft's
  `update_and_allocate(t)` after the optimiser's step: below total_steps - tfinal the EMAs
  take this step's |w·g| (w the updated weights) and, on schedule, every triplet scoring at or
  below the (initial - budget)-th lowest score gets E = 0; at total_steps - tfinal the final
  allocation to the target budget is made and the EMAs are cleared; after it that pattern is
  kept. A step the optimiser skips (`apply` False) leaves all but the step count alone.

  Raises:
    ValueError: a schedule without a budgeting phase (tinit >= total_steps - tfinal).
  """
  final = total_steps - settings.tfinal
  if settings.tinit >= final:
    raise ValueError(f"peft.tinit={settings.tinit} + peft.tfinal={settings.tfinal} leave no "
                     f"budgeting phase in train.steps={total_steps}")

  def init_fn(params: Any) -> AllocatorState:
    adapter = params["adapter"]
    zeros = jax.tree.map(jnp.zeros_like, adapter)
    keep = unflatten({site: jax.tree.map(lambda e: jnp.ones(e.shape, jnp.bool_), t[E])
                      for site, t in _triplets(adapter).items()})
    return AllocatorState(inner.init(params), jnp.zeros((), jnp.int32), zeros, zeros, keep)

  def update_fn(grads: Any, state: AllocatorState, params: Any = None, **extra: Any
                ) -> tuple[Any, AllocatorState]:
    updates, inner_state = inner.update(grads, state.inner, params, **extra)
    apply, t = extra.get("apply", jnp.array(True)), state.count
    init_bgt, target_bgt = budgets(settings, params["adapter"])
    weights = jax.tree.map(jnp.add, params["adapter"], updates["adapter"])
    learning, cleared = t < final, t == final  # peft: reset_ipt after the final allocation
    ipt, unc = (jax.tree.map(lambda new, old: jnp.where(learning, new, old), new_tree, old_tree)
                for new_tree, old_tree in zip(_smoothed(settings, state, weights,
                                                        grads["adapter"]),
                                              (state.ipt, state.unc)))
    budget, scheduled = budget_schedule(t, init_bgt, target_bgt, settings, total_steps)
    allocate = (scheduled & learning) | cleared
    old_keep = flatten(state.keep)
    keep = {site: jnp.where(allocate, kept, old_keep[site])
            for site, kept in _kept(_scores(ipt, unc), init_bgt - budget).items()}
    masking = allocate | (t > final)
    flat_updates, flat_params = flatten(updates["adapter"]), flatten(params["adapter"])
    for site, kept in keep.items():  # E + update = 0 where pruned
      name = f"{site}/{E}"
      flat_updates[name] = jnp.where(masking & ~kept, -flat_params[name], flat_updates[name])
    ipt, unc = (jax.tree.map(lambda x: jnp.where(cleared, jnp.zeros_like(x), x), tree)
                for tree in (ipt, unc))
    allocated = AllocatorState(inner_state, t + 1, ipt, unc, unflatten(keep))
    skipped = state._replace(inner=inner_state, count=t + 1)
    new_state = jax.tree.map(lambda n, o: jnp.where(apply, n, o), allocated, skipped)
    masked = {**updates, "adapter": unflatten(flat_updates)}
    return jax.tree.map(lambda m, u: jnp.where(apply, m, u), masked, updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def rank_pattern(adapter: Any) -> dict[str, np.ndarray]:
  """{site: bool [*layers, r]}: the triplets with E != 0 (host arrays), those the model
  computes with."""
  return {site: np.asarray(t[E]) != 0 for site, t in _triplets(adapter).items()}
