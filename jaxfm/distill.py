r"""Knowledge distillation: a fine-tuned teacher trains a smaller student.

  python -m jaxfm.distill --config=configs/distill/sst2_minilm.py --workdir=runs/sst2_student \
      --config.teacher=runs/sst2_teacher --config.data.train_file=SST-2/train.tsv \
      --config.data.dev_file=SST-2/dev.tsv

Running the same command again resumes. The workdir is a fine-tuning workdir: `python -m
jaxfm.evaluate`, `jaxfm.predict` and `jaxfm.convert --to_hf` read the student as any. Prints
one JSON line: the final step, the best checkpoint's step and the last dev metrics. Exit
status: 0 when finished (the workdir then holds DONE), 143 after a SIGTERM save (relaunch to
resume), 1 on a user error.
"""

from __future__ import annotations

import json

import jax

from jaxfm import runtime
from jaxfm.distillation import run

_FLAGS = runtime.define_run_flags("The student's checkpoints, logs, labels and tokenizer.")


def main(argv):
  del argv
  with runtime.exit_on(run.USER_ERRORS):
    runtime.initialize_runtime()
    runtime.check_paths(_FLAGS.config.value, workdir=_FLAGS.workdir.value)
    runtime.use_compilation_cache(_FLAGS.workdir.value)
    result, best_step = run.distill(_FLAGS.config.value, _FLAGS.workdir.value,
                                    _FLAGS.allow_config_change.value)
  if jax.process_index() == 0:
    print(json.dumps({"step": result.step, "best_step": best_step,
                      "early_stopped": result.stopped_early, "preempted": result.preempted,
                      "dev": result.eval}))
  runtime.finish_training(_FLAGS.workdir.value, result.step, result.preempted)


if __name__ == "__main__":
  runtime.run_program(main)
