r"""Knowledge distillation: a fine-tuned teacher trains a smaller student.

  python -m jaxfm.distill --config=configs/distill/sst2_minilm.py --workdir=runs/sst2_student \
      --config.teacher=runs/sst2_teacher --config.data.train_file=SST-2/train.tsv \
      --config.data.dev_file=SST-2/dev.tsv

Running the same command again resumes. The workdir is a fine-tuning workdir: `python -m
jaxfm.evaluate`, `jaxfm.predict` and `jaxfm.convert --to_hf` read the student as any. With
`task='mlm'` (configs/distill/mlm_distilbert.py) the teacher is an MLM checkpoint and the student
learns on the pretraining corpus (DistilBERT); the finished student is WORKDIR/student, a model
dir for `jaxfm.finetune --config.init_from`. Prints one JSON line: the final step, the best
checkpoint's step and the last dev metrics. Exit status: 0 when finished (the workdir then holds
DONE), 143 after a SIGTERM save (relaunch to resume), 1 on a user error.
"""

from __future__ import annotations

from jaxfm import runtime
from jaxfm.distillation import distill
from jaxfm.finetuning import run as finetuning

_FLAGS = runtime.define_run_flags("The student's checkpoints, logs, labels and tokenizer.")


def main(argv):
  del argv
  finetuning.train_cli(_FLAGS, distill)


if __name__ == "__main__":
  runtime.run_program(main)
