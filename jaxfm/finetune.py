r"""Task fine-tuning: classification / regression, NER, extractive QA.

  python -m jaxfm.finetune --config=configs/finetune/sst2.py --workdir=runs/sst2 \
      --config.init_from=hf:/path/to/bert-base-uncased   # or a jaxfm pretraining workdir

Running the same command again resumes. `python -m jaxfm.evaluate` and `python -m
jaxfm.predict` then need only the workdir. Prints one JSON line: the final step, the best
checkpoint's step and the last dev metrics.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

from jaxfm import runtime
from jaxfm.finetuning import run

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs, labels and tokenizer.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config differs from the saved one.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  try:
    runtime.initialize_runtime()
    runtime.use_compilation_cache(_WORKDIR.value)
    result, best_step = run.finetune(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except run.USER_ERRORS as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print(json.dumps({"step": result.step, "best_step": best_step,
                      "early_stopped": result.stopped_early, "preempted": result.preempted,
                      "dev": result.eval}))


if __name__ == "__main__":
  runtime.run_program(main)
