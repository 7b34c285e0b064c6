"""Where parameters come from: a Hugging Face folder (`hf:DIR`), a jaxfm model dir, or a jaxfm
training workdir (its best checkpoint when it keeps one, else its newest)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import numpy as np
from absl import logging
from etils import epath

from jaxfm import config as config_lib
from jaxfm import compress, interop, peft
from jaxfm import workdir as workdir_lib
from jaxfm.interop.checkpoint_dir import CONFIG_FILE as MODEL_CONFIG_FILE
from jaxfm.models import BertConfig, stack_layers, unstack_layers
from jaxfm.train import best, checkpoint
from jaxfm.trees import flatten, unflatten


class Weights(NamedTuple):
  """An architecture, its params (numpy), its tokenizer folder (None if unknown) and, for a
  workdir's best checkpoint, which step they came from (else "")."""

  config: BertConfig
  params: Any
  tokenizer_dir: str | None
  origin: str = ""


@dataclasses.dataclass(frozen=True)
class WorkdirParams:
  params: Any
  step: int
  best: bool  # the best evaluation's params, not the newest checkpoint's

  def describe(self) -> str:
    return f"{'best' if self.best else 'latest'} checkpoint (step {self.step})"


def workdir_params(workdir: str, abstract_state: Any = None) -> WorkdirParams:
  """The params of a training workdir: its best checkpoint when it keeps one, else its newest.

  With `abstract_state` (the train state's shapes and shardings, `loop.Steps.abstract_state`)
  they land on its mesh and a damaged newest step falls back to the previous one; without,
  they are numpy arrays on this host, whatever topology wrote them.

  Raises:
    FileNotFoundError: the workdir holds no checkpoint.
  """
  found = best.restore_best(workdir, None if abstract_state is None else abstract_state.params)
  if found is not None:
    params = found[1] if abstract_state is not None else jax.device_get(found[1])
    return WorkdirParams(params, found[0], best=True)
  if abstract_state is None:
    step, params = checkpoint.restore_latest_params(workdir)
    return WorkdirParams(params, step, best=False)
  manager = checkpoint.make_manager(workdir, keep=1)
  restored = checkpoint.restore_latest(manager, abstract_state)
  manager.close()
  if restored is None:
    raise FileNotFoundError(f"{workdir} holds no checkpoint to evaluate")
  return WorkdirParams(restored.state.params, restored.step, best=False)


def load_jaxfm(path: str) -> Weights:
  """A jaxfm model dir or a training workdir (see `workdir_params`)."""
  root = epath.Path(path)  # local, or a gs:// workdir
  if not root.is_dir():
    raise FileNotFoundError(f"{path}: no such directory")
  if (root / MODEL_CONFIG_FILE).is_file():
    if workdir_lib.on_object_store(path):
      raise FileNotFoundError(f"{path}: a model dir is read from a local folder only; copy it "
                              "there (gsutil -m cp -r), or name a gs:// training workdir")
    return Weights(*interop.load_model_dir(path))
  config = workdir_lib.read_model_config(path)
  _refuse_not_a_model(path)
  loaded = workdir_params(path)
  return Weights(config, loaded.params, workdir_lib.existing_tokenizer_dir(path),
                 loaded.describe() if loaded.best else "")


def _refuse_not_a_model(workdir: str) -> None:
  """An int8 folder holds no float checkpoint, a PEFT workdir's checkpoints only an adapter and
  a head: says what to start from instead."""
  if compress.is_int8_dir(workdir):
    raise config_lib.ConfigError(
        f"init_from={workdir} is an int8 folder (jaxfm.quantize): start from the workdir it was "
        f"quantized from (with quantize.qat to keep training for int8)")
  run_cfg = workdir_lib.read_config(workdir)
  method = run_cfg.get("peft", {}).get("method", "")
  if not method:
    return
  merged = (f"; to start from its merged model: python -m jaxfm.convert --to_hf "
            f"--from={workdir} --out=DIR, then init_from=hf:DIR"
            if peft.METHODS[method].folds else "")
  raise config_lib.ConfigError(
      f"init_from={workdir} is a parameter-efficient run (peft.method={method!r}): its "
      f"checkpoints hold only the adapter and head. To go on training that adapter: "
      f"init_from={run_cfg.init_from} (its base) with peft.init_adapter={workdir}{merged}")


def read_pretrained(init_from: str, task: str) -> Weights:
  """The weights `init_from` names: 'hf:DIR', a jaxfm model dir or a workdir.

  `task` is the interop task for HF folders ("mlm", or "auto" to take the MLM head only
  when the checkpoint has one); a missing head is initialised and reported.
  """
  if init_from.startswith("hf:"):
    result = interop.import_hf(init_from[3:], task=task, init_missing_head=True)
    logging.info("init_from %s: initialised %s", init_from, result.initialised or "nothing")
    return Weights(result.config, result.params, init_from[3:])
  return load_jaxfm(init_from)


def in_layout(params: Any, config: BertConfig) -> Any:
  """`params` (any layout, also an older jaxfm's scanned stack of every layer) in the layer
  layout `config.scan_layers` asks for."""
  params = unstack_layers(params)
  return stack_layers(params) if config.scan_layers else params


def provided_params(params: Any, config: BertConfig, task_params: Any) -> dict[str, np.ndarray]:
  """The entries of the task model's params (`task_params`: their shapes, any boxing) that
  checkpoint `params` provide, flat, in `config`'s layer layout and the model's dtypes: a PEFT
  run's frozen base."""
  pretrained = flatten(in_layout(params, config))
  shapes = flatten(task_params)
  return {name: np.asarray(pretrained[name], shape.dtype) for name, shape in shapes.items()
          if name in pretrained}


def load_initial_params(init_from: str, config: BertConfig, task: str) -> Any:
  """Weights from 'hf:DIR', a jaxfm model dir or a jaxfm workdir, in `config`'s layout."""
  source = read_pretrained(init_from, task)
  for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
    if getattr(source.config, field) != getattr(config, field):
      raise config_lib.ConfigError(
          f"init_from={init_from}: its {field}={getattr(source.config, field)} differs from "
          f"model.{field}={getattr(config, field)}")
  return in_layout(source.params, config)


@dataclasses.dataclass(frozen=True)
class MergedParams:
  params: Any
  initialised: list[str]  # task-model params not in the checkpoint (new heads)
  dropped: list[str]  # checkpoint params the task model has no use for (e.g. the MLM head)


def merge_pretrained(fresh: Any, pretrained: Any, source: str) -> MergedParams:
  """Takes every parameter of `fresh` from `pretrained` where it exists (shapes must agree)."""
  new, old = flatten(fresh), flatten(pretrained)
  merged, initialised = {}, []
  for name, value in new.items():
    if name not in old:
      merged[name] = value
      initialised.append(name)
      continue
    if tuple(old[name].shape) != tuple(value.shape):
      raise ValueError(f"init_from={source}: {name} has shape {tuple(old[name].shape)}, the "
                       f"task model needs {tuple(value.shape)}")
    merged[name] = np.asarray(old[name], value.dtype)
  if not any(n.startswith("encoder/") and n not in initialised for n in new):
    raise ValueError(f"init_from={source}: no encoder parameter matched; is it a BERT checkpoint?")
  dropped = sorted(set(old) - set(new))
  logging.info("init_from %s: %d params loaded; initialised %s; dropped %s", source,
               len(new) - len(initialised), initialised or "nothing",
               _prefixes(dropped) or "nothing")
  return MergedParams(unflatten(merged), initialised, dropped)


def _prefixes(names: Sequence[str]) -> list[str]:
  """The distinct top-two-level groups of parameter names (for concise reports)."""
  return sorted({"/".join(n.split("/")[:2]) for n in names})
