"""The jaxfm model directory, plus the file helpers the converters share.

Layout of a model dir:
  model_config.json    `BertConfig` fields
  params.safetensors   parameters of the unscanned layout, named by '/'-joined tree paths
  tokenizer/           vocab.txt / tokenizer.json / tokenizer_config.json, when known

It is torch-free and readable by any safetensors implementation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Any, Iterable, Iterator

import numpy as np
import safetensors
import safetensors.numpy

from jaxfm.models import BertConfig, stack_layers, unstack_layers
from jaxfm.sharding import unbox
from jaxfm.trees import flatten, unflatten

CONFIG_FILE = "model_config.json"
PARAMS_FILE = "params.safetensors"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")

Params = dict[str, Any]


@contextlib.contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
  """Yields a temporary folder next to `out_dir` that becomes `out_dir` if the block succeeds.

  On any error the temporary folder is removed, so nothing half-written is left.
  `out_dir` must not exist yet, or be an empty directory.
  """
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
    raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    yield tmp
    for root, dirs, files in os.walk(tmp):  # mkdtemp and some writers create private modes
      os.chmod(root, 0o755)
      for name in files:
        os.chmod(os.path.join(root, name), 0o644)
    os.replace(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file; unreadable files raise one ValueError naming `path`."""
  try:
    return safetensors.numpy.load_file(path)
  except (safetensors.SafetensorError, ValueError, TypeError) as e:
    raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def numpy_params(params: Params) -> dict[str, np.ndarray]:
  """Flat float32 numpy parameters of the unscanned layout, from any (boxed, scanned) tree."""
  if "encoder" not in params:
    raise ValueError(f"params have no 'encoder' subtree (top level: {sorted(params)})")
  tree = unstack_layers(unbox(params))
  return {k: np.ascontiguousarray(v, np.float32) for k, v in flatten(tree).items()}


def copy_tokenizer_files(files: Iterable[str], out_dir: str) -> list[str]:
  """Copies the given tokenizer files into `out_dir`; returns the names copied."""
  names = []
  for path in files:
    os.makedirs(out_dir, exist_ok=True)
    shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
    names.append(os.path.basename(path))
  return names


def tokenizer_files(directory: str | None) -> list[str]:
  """The known tokenizer files present in `directory` (none when it is None)."""
  if directory is None:
    return []
  return [os.path.join(directory, n) for n in TOKENIZER_FILES
          if os.path.isfile(os.path.join(directory, n))]


def save_model_dir(out_dir: str, config: BertConfig, params: Params,
                   tokenizer_files: Iterable[str] = ()) -> None:
  """Writes a jaxfm model dir atomically (see the module docstring for the layout)."""
  flat = numpy_params(params)
  with atomic_directory(out_dir) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(dataclasses.asdict(config), f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(flat, os.path.join(tmp, PARAMS_FILE),
                                metadata={"format": "jaxfm"})
    copy_tokenizer_files(tokenizer_files, os.path.join(tmp, TOKENIZER_DIR))


def load_model_dir(path: str) -> tuple[BertConfig, Params, str | None]:
  """Reads a jaxfm model dir.

  Returns:
    The config, float32 numpy params in the layout `config.scan_layers` asks for,
    and the tokenizer folder (None when the dir has none).
  """
  config_path = os.path.join(path, CONFIG_FILE)
  try:
    with open(config_path) as f:
      config = BertConfig.from_mapping(json.load(f))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{config_path}: not a valid model config ({e})") from None
  params = unflatten(read_safetensors(os.path.join(path, PARAMS_FILE)))
  if config.scan_layers:
    params = stack_layers(params)
  tokenizer_dir = os.path.join(path, TOKENIZER_DIR)
  return config, params, tokenizer_dir if os.path.isdir(tokenizer_dir) else None
