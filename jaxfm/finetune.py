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

from jaxfm import runtime
from jaxfm.finetuning import run

_FLAGS = runtime.define_run_flags("Checkpoints, logs, labels and tokenizer.")


def main(argv):
  del argv
  run.train_cli(_FLAGS)


if __name__ == "__main__":
  runtime.run_program(main)
