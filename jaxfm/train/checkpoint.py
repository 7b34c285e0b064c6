"""Orbax checkpoints of the train state, loader state and run metadata.

Every host calls the same functions (Orbax coordinates multi-host writes).
A step that fails to restore is quarantined (renamed `<step>.corrupt`, never
deleted) and the previous step is tried; if checkpoints exist but none
restores, we refuse to start rather than silently training from scratch.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

STATE, DATA, META = "state", "data", "meta"


class CheckpointError(RuntimeError):
  """No usable checkpoint where one was expected."""


@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data: Any  # loader iterator state (JSON)
  meta: dict[str, Any]


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def make_manager(workdir: str, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                         create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=(STATE, DATA, META))


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: Any,
         meta: dict[str, Any], force: bool = False) -> bool:
  """Starts an (async) save of `step`; returns whether a save was started."""
  return manager.save(step, args=ocp.args.Composite(**{
      STATE: ocp.args.StandardSave(state),
      DATA: ocp.args.JsonSave(data_state),
      META: ocp.args.JsonSave(meta),
  }), force=force)


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
  source = checkpoint_dir(str(manager.directory.parent)) / str(step)
  target = source.parent / f"{step}.corrupt"
  suffix = 0
  while target.exists():
    suffix += 1
    target = source.parent / f"{step}.corrupt{suffix}"
  if jax.process_index() == 0 and source.exists():
    source.rename(target)
  manager.reload()
  return target


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any) -> Restored | None:
  """Restores the newest readable step into `abstract_state`'s shapes and shardings.

  Returns None when the workdir holds no checkpoint at all.
  """
  tried = []
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      restored = manager.restore(step, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: ocp.args.JsonRestore(),
          META: ocp.args.JsonRestore(),
      }))
    except Exception as e:  # noqa: BLE001 - any failure to read a step means it is unusable
      target = _quarantine(manager, step)
      logging.error("checkpoint step %d in %s cannot be restored (%s: %s); quarantined it as "
                    "%s and trying the previous step", step, manager.directory, type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "", target)
      tried.append(step)
      continue
    return Restored(step=step, state=restored[STATE], data=restored[DATA], meta=restored[META])
  if tried:
    raise CheckpointError(f"none of the checkpoints in {manager.directory} could be restored "
                          f"(steps {tried}, now quarantined as '<step>.corrupt'); refusing to "
                          "start from scratch over them. Move them away to start anew.")
  return None


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying `shardings`, the restore target Orbax needs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text())


def load_params(workdir: str) -> tuple[Any, Any, str | None]:
  """(BertConfig, params as numpy, tokenizer dir | None) of a workdir's newest checkpoint."""
  from jaxfm.models.config import BertConfig  # pylint: disable=g-import-not-at-top
  root = epath.Path(workdir)
  config_file = root / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{workdir} is not a jaxfm workdir: {config_file} is missing")
  model = dict(read_json(config_file)["config"]["model"])
  model["embedding_size"] = model.get("embedding_size") or None
  manager = ocp.CheckpointManager(checkpoint_dir(workdir), item_names=(STATE, DATA, META))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{workdir} holds no checkpoint")
  restored = manager.restore(step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore()}))
  params = jax.tree.map(lambda x: jax.device_get(x), restored[STATE]["params"])
  tokenizer = root / "tokenizer"
  return BertConfig.from_mapping(model), params, str(tokenizer) if tokenizer.exists() else None
