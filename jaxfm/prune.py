r"""Structured pruning of a fine-tuned encoder: attention heads and FFN neurons removed.

  python -m jaxfm.prune --config=configs/prune/sst2_minilm.py --workdir=runs/sst2_pruned \
      --config.init_from=runs/sst2 --config.prune.heads_share=0.25 \
      --config.prune.ffn_share=0.25 \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv

Ranks the workdir's heads and neurons (`prune.importance`: gradient x activation on
`prune.batches` training batches, or weight magnitude), slices the lowest away and writes the
smaller model as a new fine-tuning workdir (`jaxfm.compress.prune_run`), which `evaluate`,
`predict` and `convert --to_hf` read as any. Recovery fine-tuning is a fine-tuning run from it:

  python -m jaxfm.finetune --config=configs/finetune/sst2.py --workdir=runs/sst2_pruned_ft \
      --config.init_from=runs/sst2_pruned --config.train.epochs=1 ...

Prints one JSON line (what was removed, parameters before and after, dev metrics); on a user
error prints one line and exits with status 1.
"""

from __future__ import annotations

import json

import jax

from jaxfm import runtime
from jaxfm.compress import prune_run
from jaxfm.finetuning import run as finetuning

_FLAGS = runtime.define_run_flags("The pruned model's new workdir (must not exist or be empty).")


def main(argv):
  del argv
  with runtime.exit_on(finetuning.USER_ERRORS):
    runtime.initialize_runtime()
    runtime.check_paths(_FLAGS.config.value, workdir=_FLAGS.workdir.value)
    info = prune_run.prune(_FLAGS.config.value, _FLAGS.workdir.value)
  if jax.process_index() == 0:
    print(json.dumps(info))


if __name__ == "__main__":
  runtime.run_program(main)
