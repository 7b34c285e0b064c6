r"""Time to result: a whole fine-tuning run, process start to dev score, jaxfm beside PyTorch.

  python -m benchmarks.time_to_result --model=MODEL_DIR --task=classification \
      --train=SST-2/train.tsv --dev=SST-2/dev.tsv --max_train_examples=2000 --epochs=1

Runs `jaxfm.finetune` (its config for the task, defaults otherwise: length buckets chosen from
the data, a fresh workdir and compilation cache) and `benchmarks.torch_loop` (transformers with
dynamic padding) one after the other with the same recipe: the same examples, batch size,
epochs, peak learning rate, warmup share, weight decay, clipping and truncation length. Each
side's wall time and CPU seconds are its child's, from spawn to exit (on a machine shared with
other work compare the CPU seconds, or alternate the sides with `--repeats`). Prints one JSON
line per run and the ratios of the medians.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np
from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "A transformers BERT folder (config, weights, vocab).")
_TASK = flags.DEFINE_enum("task", "classification", ["classification", "ner"], "Task kind.")
_TRAIN = flags.DEFINE_string("train", None, "Training file.")
_DEV = flags.DEFINE_string("dev", None, "Dev file.")
_TEXT_FIELDS = flags.DEFINE_string("text_fields", "sentence", "Classification: comma-separated.")
_MAX_TRAIN = flags.DEFINE_integer("max_train_examples", 0, "0 = all; else the first N.")
_MAX_LEN = flags.DEFINE_integer("max_seq_length", 128, "Truncation length.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_EPOCHS = flags.DEFINE_float("epochs", 1.0, "Epochs.")
_LR = flags.DEFINE_float("learning_rate", 5e-5, "Peak learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed.")
_SIDES = flags.DEFINE_list("sides", ["jaxfm", "torch"], "Which to run, in this order.")
_REPEATS = flags.DEFINE_integer(
    "repeats", 1, "Runs of each side, alternating (on a shared machine both meet its load); "
    "the ratios compare the medians.")
flags.mark_flags_as_required(["model", "train", "dev"])

_CONFIGS = {"classification": "configs/finetune/sst2.py", "ner": "configs/finetune/conll2003.py"}


def _cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def _run(command: list[str]) -> tuple[dict[str, Any], dict[str, float]]:
  """The child's last JSON line, and its wall time and CPU seconds (less sensitive to other work
  on the machine); exits with its output if it failed."""
  start, cpu_start = time.time(), _cpu_s()
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  times = {"wall_s": round(time.time() - start, 1), "cpu_s": round(_cpu_s() - cpu_start, 1)}
  if result.returncode != 0:
    sys.exit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
  return json.loads(lines[-1]), times


def _jaxfm(workdir: str) -> dict[str, Any]:
  overrides = {
      "init_from": f"hf:{_MODEL.value}", "data.train_file": _TRAIN.value,
      "data.dev_file": _DEV.value, "data.max_train_examples": _MAX_TRAIN.value,
      "data.max_seq_length": _MAX_LEN.value, "train.batch_size": _BATCH.value,
      "train.epochs": _EPOCHS.value, "optim.peak_learning_rate": _LR.value,
      "optim.warmup_ratio": 0.1, "optim.weight_decay": 0.01, "train.seed": _SEED.value,
      "data.seed": _SEED.value, "train.progress_bar": False}
  if _TASK.value == "classification":
    overrides["data.text_fields"] = _TEXT_FIELDS.value
  out, times = _run([sys.executable, "-m", "jaxfm.finetune",
                     f"--config={_CONFIGS[_TASK.value]}", f"--workdir={workdir}",
                     *(f"--config.{k}={v}" for k, v in overrides.items())])
  return {"impl": "jaxfm", **out["dev"], "steps": out["step"], **times}


def _torch() -> dict[str, Any]:
  out, times = _run([sys.executable, "-m", "benchmarks.torch_loop", f"--model={_MODEL.value}",
                      f"--task={_TASK.value}", f"--train={_TRAIN.value}", f"--dev={_DEV.value}",
                      f"--text_fields={_TEXT_FIELDS.value}",
                      f"--max_train_examples={_MAX_TRAIN.value}",
                      f"--max_seq_length={_MAX_LEN.value}", f"--batch_size={_BATCH.value}",
                      f"--epochs={_EPOCHS.value}", f"--learning_rate={_LR.value}",
                      f"--seed={_SEED.value}"])
  return {**out, **times}


def main(argv):
  del argv
  results: dict[str, list[dict[str, Any]]] = {side: [] for side in _SIDES.value}
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(_REPEATS.value):
      for side in _SIDES.value:
        result = _jaxfm(f"{tmp}/run{repeat}") if side == "jaxfm" else _torch()
        results[side].append(result)
        print(json.dumps(result), flush=True)
  if len(results) == 2:
    median = {side: {k: float(np.median([r[k] for r in runs])) for k in ("wall_s", "cpu_s")}
              for side, runs in results.items()}
    print(json.dumps({f"torch_over_jaxfm_{k}": round(median["torch"][k] / median["jaxfm"][k], 3)
                      for k in ("wall_s", "cpu_s")}))


if __name__ == "__main__":
  app.run(main)
