"""Compression of fine-tuned encoders: post-training int8 quantization (`quantize`), the int8
folder `jaxfm.quantize` writes (`int8_dir`) and the eval step that runs it (`inference`);
quantization-aware fine-tuning (`qat`, the `quantize.qat` option of `jaxfm.finetune`);
structured pruning of attention heads and FFN neurons (`pruning`, run by `prune_run`).

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
  from jaxfm.train.loop import Task

MODES = ("weight_only", "w8a8")
INFO_FILE = "quantization.json"  # marks an int8 folder


def is_int8_dir(path: str) -> bool:
  """Whether `path` is an int8 folder (`jaxfm.quantize` wrote it), not a training workdir."""
  return os.path.isfile(os.path.join(path, INFO_FILE))


def qat_task(task: Task, kind: str, mode: str) -> Task:
  """`qat.qat_task`: `task` computing as its int8 export in `mode` does (float params)."""
  from jaxfm.compress import qat  # pylint: disable=g-import-not-at-top  (needs qwix)
  return qat.qat_task(task, kind, mode)


def int8_inference(path: str, cfg: ml_collections.ConfigDict, task: Task,
                   mesh: jax.sharding.Mesh) -> Int8Inference:
  """`inference.int8_inference`: the int8 folder `path` ready to score or predict on `mesh`."""
  from jaxfm.compress import inference  # pylint: disable=g-import-not-at-top  (needs qwix)
  return inference.int8_inference(path, cfg, task, mesh)
