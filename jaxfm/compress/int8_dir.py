"""The int8 folder `jaxfm.quantize` writes: an inference-only workdir.

  config.json, task.json, tokenizer/   copied from the fine-tuning workdir, so that `evaluate`
                                       and `predict` find what they read there (the folder
                                       is deployable without the training workdir)
  int8.safetensors                     NAME/qvalue (int8) and NAME/scale (float32) for each
                                       quantized parameter, NAME (float32) for the others;
                                       the unscanned layout, as a jaxfm model dir
  quantization.json                    the mode (how the folder is run: the int8 arrays are
                                       the same for both), the source checkpoint, the
                                       library, the sizes

The source workdir may be on any storage jaxfm reads; the folder is local, like a jaxfm model
dir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from importlib import metadata
from typing import Any

import jax
import numpy as np
import safetensors.numpy
from etils import epath

from jaxfm import weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import INFO_FILE, is_int8_dir, qat_mode, quantize
from jaxfm.interop.checkpoint_dir import atomic_directory, read_safetensors
from jaxfm.models import stack_layers, unstack_layers
from jaxfm.trees import flatten, unflatten

PARAMS_FILE = "int8.safetensors"
_COPIED = (workdir_lib.CONFIG_FILE, workdir_lib.TASK_FILE)


@dataclasses.dataclass(frozen=True)
class Int8Model:
  """An int8 folder read back (or a quantization-aware workdir's int8 model, `load`): host
  params (QArrays and float32 arrays) in the layout its config asks for, and how they are to
  be run."""

  params: Any
  mode: str
  origin: str  # the checkpoint they were quantized from

  def describe(self) -> str:
    return f"int8 {self.mode} params of the {self.origin}"

  def dequantized(self) -> Any:
    """The float32 params the model computes with (int8 x scale: the int8 grid), on the host."""
    return jax.device_get(jax.jit(quantize.dequantize_params)(self.params))


def write(workdir: str, out: str, mode: str = "") -> dict[str, Any]:
  """Quantizes the best (else latest) params of the fine-tuning `workdir` into the int8
  folder `out` (which must not exist or be empty); returns what quantization.json records.
  `mode` '' is the one the run trained for (`quantize.qat`), else w8a8.

  Raises:
    FileNotFoundError: `workdir` is not a fine-tuning workdir, or holds no checkpoint.
    ValueError: an unknown mode, or a parameter-efficient run (its checkpoints hold an adapter).
  """
  if mode:
    quantize.check_mode(mode)
  workdir_lib.load_run(workdir)  # a fine-tuning workdir: config, labels and tokenizer
  cfg = workdir_lib.read_config(workdir)
  mode = mode or qat_mode(cfg) or "w8a8"
  if cfg.get("peft") and cfg.peft.method:
    raise ValueError(f"{workdir} trained a {cfg.peft.method} adapter; int8 quantization takes "
                     "fully fine-tuned workdirs only")
  with atomic_directory(out) as tmp:  # refuses a non-empty `out` before any work
    loaded = weights.workdir_params(workdir)
    quantized = _quantized(loaded.params)
    info = {"mode": mode, "origin": _origin(loaded, workdir),
            "library": f"qwix {metadata.version('qwix')}",
            "float32_bytes": quantize.nbytes(loaded.params),
            "int8_bytes": quantize.nbytes(quantized)}
    _copy_run_files(workdir, tmp)
    safetensors.numpy.save_file(_flat(quantized), os.path.join(tmp, PARAMS_FILE),
                                metadata={"format": "jaxfm-int8"})
    with open(os.path.join(tmp, INFO_FILE), "w") as f:
      json.dump(info, f, indent=2)
  return {**info, "file_bytes": os.path.getsize(os.path.join(out, PARAMS_FILE))}


def _quantized(params: Any) -> Any:
  """Float params (either layout) quantized as `write` stores them: unscanned, on the host."""
  return jax.device_get(quantize.quantize_params(unstack_layers(params)))


def _origin(loaded: weights.WorkdirParams, workdir: str) -> str:
  return f"{loaded.describe()} of {workdir_lib.absolute(workdir)}"


def _copy_run_files(workdir: str, out: str) -> None:
  """The workdir's config.json, task.json and tokenizer/ into `out` (any storage to local)."""
  source, target = epath.Path(workdir), epath.Path(out)
  for name in _COPIED:
    (target / name).write_bytes((source / name).read_bytes())
  (target / workdir_lib.TOKENIZER_DIR).mkdir()
  for file in workdir_lib.tokenizer_dir(workdir).iterdir():
    (target / workdir_lib.TOKENIZER_DIR / file.name).write_bytes(file.read_bytes())


def read(path: str) -> Int8Model:
  """The int8 folder at `path`, in the layer layout its config.json asks for.

  Raises:
    FileNotFoundError: a file of the folder is missing.
    ValueError: quantization.json or int8.safetensors is unreadable.
  """
  info_path = os.path.join(path, INFO_FILE)
  try:
    with open(info_path) as f:
      info = json.load(f)
    mode = quantize.check_mode(info["mode"])
  except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{info_path}: not a valid quantization record ({e})") from None
  return _model(read_safetensors(os.path.join(path, PARAMS_FILE)), path, mode,
                info.get("origin", "unknown checkpoint"))


def load(path: str) -> Int8Model:
  """The int8 model that `path` computes with: an int8 folder's (`read`), or a
  quantization-aware workdir's (`quantize.qat`): its best (else latest) params quantized as
  `write` stores them, in the mode it trained for (its evals ran that model).

  Raises:
    FileNotFoundError: a file of the folder is missing, or the workdir holds no checkpoint.
    ValueError: an unreadable int8 folder, or a workdir that did not train for int8.
  """
  if is_int8_dir(path):
    return read(path)
  mode = qat_mode(workdir_lib.read_config(path))
  if not mode:
    raise ValueError(f"{path} is neither an int8 folder nor a quantization-aware run "
                     "(its quantize.qat is unset)")
  loaded = weights.workdir_params(path)
  return _model(_flat(_quantized(loaded.params)), path, mode, _origin(loaded, path))


def _model(flat: dict[str, np.ndarray], path: str, mode: str, origin: str) -> Int8Model:
  """The model of `int8.safetensors` entries (`_flat`), in the layer layout of the config.json
  at `path`."""
  tree = unflatten(flat)
  if workdir_lib.read_model_config(path).scan_layers:
    tree = stack_layers(tree)
  return Int8Model(_with_qarrays(tree), mode, origin)


def _flat(params: Any) -> dict[str, np.ndarray]:
  """Flat safetensors entries: NAME/qvalue and NAME/scale for a QArray, NAME otherwise."""
  flat = {}
  for name, leaf in flatten(params).items():
    if quantize.is_quantized(leaf):
      flat[f"{name}/qvalue"], flat[f"{name}/scale"] = leaf.qvalue, leaf.scale
    else:
      flat[name] = leaf
  return {k: np.ascontiguousarray(v) for k, v in flat.items()}


def _with_qarrays(tree: Any) -> Any:
  """The nested dicts `unflatten` makes, with each {qvalue (int8), scale} pair as a QArray."""
  if not isinstance(tree, dict):
    return tree
  if set(tree) == {"qvalue", "scale"} and tree["qvalue"].dtype == np.int8:
    return quantize.QArray(qvalue=tree["qvalue"], scale=tree["scale"])
  return {k: _with_qarrays(v) for k, v in tree.items()}

