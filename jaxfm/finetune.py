r"""Task fine-tuning: classification / regression, NER, extractive QA.

  python -m jaxfm.finetune --config=configs/finetune/sst2.py --workdir=runs/sst2 \
      --config.init_from=hf:/path/to/bert-base-uncased   # or a jaxfm pretraining workdir

Running the same command again resumes. `python -m jaxfm.evaluate` and `python -m
jaxfm.predict` then need only the workdir. Prints one JSON line: the final step, the best
checkpoint's step and the last dev metrics. Exit status: 0 when finished (`train.steps` or early
stopping; the workdir then holds DONE), 143 after a SIGTERM save (relaunch to resume), 1 on a
user error.
"""

from __future__ import annotations

import json

import jax

from jaxfm import runtime
from jaxfm.finetuning import run

_FLAGS = runtime.define_run_flags("Checkpoints, logs, labels and tokenizer.")


def main(argv):
  del argv
  with runtime.exit_on(run.USER_ERRORS):
    runtime.initialize_runtime()
    runtime.check_paths(_FLAGS.config.value, workdir=_FLAGS.workdir.value)
    runtime.use_compilation_cache(_FLAGS.workdir.value)
    result, best_step = run.finetune(_FLAGS.config.value, _FLAGS.workdir.value,
                                     _FLAGS.allow_config_change.value)
  if jax.process_index() == 0:
    print(json.dumps({"step": result.step, "best_step": best_step,
                      "early_stopped": result.stopped_early, "preempted": result.preempted,
                      "dev": result.eval}))
  runtime.finish_training(_FLAGS.workdir.value, result.step, result.preempted)


if __name__ == "__main__":
  runtime.run_program(main)
