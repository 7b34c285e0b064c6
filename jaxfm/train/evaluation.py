"""One pass of the eval step over this host's batches: loss summary, task scores, predictions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import jax
import numpy as np

from jaxfm import sharding
from jaxfm.train.step import Sums

if TYPE_CHECKING:
  from jaxfm.train.loop import Steps, Task

LocalBatch = dict[str, np.ndarray]


def gather_outputs(outputs: list[dict[str, jax.Array]]) -> dict[str, np.ndarray]:
  """Per-batch predict outputs -> numpy arrays of the real rows, sorted by `feature_index`.

  Packed batches (`data.packing`) give outputs per example slot, [rows, slots, ...] with
  `feature_index` [rows, slots]: each slot is one row here. Per-position outputs of batches
  cut to different lengths (`data.length_buckets`) are padded with zeros on axis 1 to the
  longest: those positions were padding.
  """
  host = [_per_example(o) for o in jax.device_get(outputs)]
  merged = {k: np.concatenate(_padded_on_axis_1([o[k] for o in host])) for k in host[0]}
  keep = np.flatnonzero(merged["feature_index"] >= 0)
  keep = keep[np.argsort(merged["feature_index"][keep], kind="stable")]
  return {k: v[keep] for k, v in merged.items()}


def predict(steps: Steps, params: Any, local_batches: Iterable[LocalBatch],
            mesh: jax.sharding.Mesh) -> dict[str, np.ndarray]:
  """All predict outputs of one pass over this host's batches (see `gather_outputs`)."""
  return gather_outputs([outputs for _, outputs in _eval_pass(steps, params, local_batches, mesh)])


def evaluate(task: Task, steps: Steps, params: Any, local_batches: Iterable[LocalBatch],
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Loss summary (and the task's scores) over one pass of this host's eval batches."""
  results = _eval_pass(steps, params, local_batches, mesh)
  if not results:
    return {}
  metrics = task.summarize(summed([sums for sums, _ in results]))
  if task.score is not None:
    metrics.update(task.score(gather_outputs([outputs for _, outputs in results])))
  return metrics


def summed(metrics: list[Sums]) -> dict[str, float]:
  """Per-batch (or per-step) device sums -> their totals, as floats on the host."""
  host = jax.device_get(metrics)
  return {k: float(np.sum([m[k] for m in host])) for k in host[0]}


def _eval_pass(steps: Steps, params: Any, local_batches: Iterable[LocalBatch],
               mesh: jax.sharding.Mesh) -> list[tuple[Sums, dict[str, jax.Array]]]:
  """`eval_step` (sums, outputs) over one pass of this host's batches."""
  return [steps.eval_step(params, sharding.global_batch(local, mesh)) for local in local_batches]


def _per_example(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """One batch's outputs with packed rows' slots [rows, slots, ...] flattened into
  [rows * slots, ...] (unchanged when `feature_index` is [rows])."""
  slots = outputs["feature_index"].shape
  if len(slots) == 1:
    return outputs
  if bad := [k for k, v in outputs.items() if v.shape[:2] != slots]:
    raise ValueError(f"packed outputs {bad} are not per example slot {slots}")
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in outputs.items()}


def _padded_on_axis_1(arrays: list[np.ndarray]) -> list[np.ndarray]:
  """`arrays` with zeros appended on axis 1 to the widest (unchanged if all are as wide)."""
  if arrays[0].ndim < 2:
    return arrays
  width = max(a.shape[1] for a in arrays)
  return [np.pad(a, [(0, 0), (0, width - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrays]
