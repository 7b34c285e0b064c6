"""Compression of fine-tuned encoders: post-training int8 quantization (`quantize`), the int8
folder `jaxfm.quantize` writes (`int8_dir`) and the eval step that runs it (`inference`);
quantization-aware fine-tuning (`qat`, the `quantize.qat` option of `jaxfm.finetune`);
structured pruning of attention heads and FFN neurons (`pruning`, run by `prune_run`).

An int8 folder or a quantization-aware workdir computes through int8 rounding wherever it goes
(`runs_int8`): `evaluate` and `predict` score its int8 model, a distillation teacher runs it,
and `convert --to_hf` exports the int8 values it computes with (`int8_model`).

Quantization needs qwix (`pip install 'jaxfm[quant]'`); what `evaluate` and `predict` call to
recognise an int8 folder does not, so qwix is imported only when one is run (or a
quantization-aware run trains or is scored). Pruning needs nothing beyond jaxfm: its output
is an ordinary (smaller) model.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
  import jax
  import ml_collections
  from jaxfm.compress.inference import Int8Inference
  from jaxfm.compress.int8_dir import Int8Model
  from jaxfm.train.loop import Task

MODES = ("weight_only", "w8a8")
INFO_FILE = "quantization.json"  # marks an int8 folder


def is_int8_dir(path: str) -> bool:
  """Whether `path` is an int8 folder (`jaxfm.quantize` wrote it), not a training workdir."""
  return os.path.isfile(os.path.join(path, INFO_FILE))


def qat_mode(cfg: ml_collections.ConfigDict) -> str:
  """The mode a run trained for under `quantize.qat`: '' for a float run (and for configs
  saved before the option)."""
  return cfg.get("quantize", {}).get("qat", "")


def runs_int8(path: str, cfg: ml_collections.ConfigDict) -> bool:
  """Whether the workdir `path` (its resolved config `cfg`) computes through int8 rounding:
  an int8 folder, or a quantization-aware run (`int8_model` reads what it computes with)."""
  return is_int8_dir(path) or bool(qat_mode(cfg))


def int8_model(path: str) -> Int8Model:
  """`int8_dir.load`: the int8 model an int8 folder or quantization-aware workdir runs."""
  from jaxfm.compress import int8_dir  # pylint: disable=g-import-not-at-top  (needs qwix)
  return int8_dir.load(path)


def int8_task(task: Task, kind: str, mode: str) -> Task:
  """`inference.int8_task`: `task` computing in `mode` with int8-grid float params."""
  from jaxfm.compress import inference  # pylint: disable=g-import-not-at-top  (needs qwix)
  return inference.int8_task(task, kind, mode)


def qat_task(task: Task, kind: str, mode: str) -> Task:
  """`qat.qat_task`: `task` computing as its int8 export in `mode` does (float params)."""
  from jaxfm.compress import qat  # pylint: disable=g-import-not-at-top  (needs qwix)
  return qat.qat_task(task, kind, mode)


def int8_inference(path: str, cfg: ml_collections.ConfigDict, task: Task,
                   mesh: jax.sharding.Mesh) -> Int8Inference:
  """`inference.int8_inference`: the int8 folder `path` ready to score or predict on `mesh`."""
  from jaxfm.compress import inference  # pylint: disable=g-import-not-at-top  (needs qwix)
  return inference.int8_inference(path, cfg, task, mesh)
