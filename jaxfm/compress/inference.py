"""Running an int8 folder: the task model that computes with it, and the eval step over its
int8 params on a mesh, for `evaluate` and `predict` (`finetuning/run.py:inference`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxfm.compress import int8_dir, quantize
from jaxfm.tasks import TASKS
from jaxfm.tasks.base import predict_outputs
from jaxfm.train import loop
from jaxfm.trees import flatten


@dataclasses.dataclass(frozen=True)
class Int8Inference:
  """What `finetuning.run.inference` needs for an int8 folder: the task and steps that run it,
  its params placed on the mesh, and where they came from."""

  task: loop.Task
  steps: loop.Steps
  params: Any
  source: str


def int8_inference(path: str, cfg: ml_collections.ConfigDict, task: loop.Task,
                   mesh: jax.sharding.Mesh) -> Int8Inference:
  """The int8 folder `path` (its resolved config `cfg`) ready to score or predict on `mesh`;
  `task` is the float task `tasks.make_task` built for it."""
  model = int8_dir.read(path)
  task = int8_task(task, cfg.task, model.mode)
  steps = loop.build_steps(cfg, task, mesh)
  steps, params = int8_steps(steps, model.params, path)
  return Int8Inference(task, steps, params, model.describe())


def int8_task(task: loop.Task, kind: str, mode: str) -> loop.Task:
  """`task` with its loss and predictions computed by `quantize.compute_model` (the same
  float param tree: the eval step dequantizes before it calls them)."""
  spec = TASKS[kind]
  model = quantize.compute_model(task.model, mode)
  return dataclasses.replace(task, model=model, loss_fn=spec.loss(model),
                             predict_fn=predict_outputs(model, spec.outputs, spec.packs))


def int8_steps(steps: loop.Steps, params: Any, path: str) -> tuple[loop.Steps, Any]:
  """`steps` whose eval step takes the int8 tree `params` (host arrays, checked against the
  model's parameters), and `params` placed on the mesh.

  Raises:
    ValueError: the folder's parameters do not fit the model its config describes.
  """
  _check_fits(params, steps.abstract_state.params, path)
  shardings = int8_shardings(steps, params)
  return with_int8_eval_step(steps, shardings), jax.tree.map(_place, params, shardings)


def int8_shardings(steps: loop.Steps, params: Any) -> Any:
  """Shardings of the int8 tree `params` (arrays or shapes): each int8 array as its float
  parameter, its scales likewise except on the axes they do not have (size 1)."""
  return jax.tree.map(_int8_sharding, steps.state_shardings.params, params)


def with_int8_eval_step(steps: loop.Steps, shardings: Any) -> loop.Steps:
  """`steps` whose eval step takes int8 params with `shardings` and dequantizes them on the
  devices before the float eval step (which the compiler inlines)."""
  float_step = steps.eval_step
  replicated = NamedSharding(steps.batch_sharding.mesh, PartitionSpec())
  eval_step = jax.jit(lambda p, batch: float_step(quantize.dequantize_params(p), batch),
                      in_shardings=(shardings, steps.batch_sharding), out_shardings=replicated)
  return dataclasses.replace(steps, eval_step=eval_step)


def _int8_sharding(sharding: NamedSharding, leaf: Any) -> Any:
  if not quantize.is_quantized(leaf):
    return sharding
  spec = tuple(sharding.spec) + (None,) * (leaf.scale.ndim - len(sharding.spec))
  scale_spec = PartitionSpec(*(None if size == 1 else axes
                               for size, axes in zip(leaf.scale.shape, spec)))
  return quantize.QArray(qvalue=sharding, scale=NamedSharding(sharding.mesh, scale_spec),
                         qtype=leaf.qtype)


def _place(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array as a global array with `sharding` (each process holds the whole of it)."""
  host = np.asarray(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _check_fits(params: Any, abstract: Any, path: str) -> None:
  """Raises ValueError naming the first parameter that the model lacks, misses or shapes
  otherwise."""
  have = flatten(jax.eval_shape(quantize.dequantize_params, params))
  want = flatten(abstract)
  for name in sorted(set(have) | set(want)):
    if name not in want or name not in have or have[name].shape != want[name].shape:
      found = have[name].shape if name in have else "nothing"
      needed = want[name].shape if name in want else "nothing"
      raise ValueError(f"{path}/{int8_dir.PARAMS_FILE}: {name} holds {found}, the model of "
                       f"its config.json needs {needed}")
