r"""Structured pruning of a fine-tuned encoder: attention heads and FFN neurons removed, then
(optionally) training to recover what they did, in one command.

  python -m jaxfm.prune --config=configs/prune/sst2_minilm.py --workdir=runs/sst2_pruned \
      --config.init_from=runs/sst2 --config.prune.heads_share=0.25 \
      --config.prune.ffn_share=0.25 --config.prune.recovery_epochs=1 \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv

Ranks the workdir's heads and neurons (`prune.importance`: gradient x activation on
`prune.batches` training batches, or weight magnitude) and slices the lowest away
(`jaxfm.compress.prune_run`). Without `prune.recovery_epochs` the workdir holds the pruned model;
with it, the pruned model goes to WORKDIR/pruned and the workdir holds the recovered one:
fine-tuned from it (`optim`, `train` as `jaxfm.finetune` reads them) or, with
`prune.recovery=distill`, distilled from the unpruned model (`distill`). `evaluate`, `predict`
and `convert --to_hf` read either as any workdir; WORKDIR/pruning.json records what was removed
and the dev metrics before and after the recovery. Relaunching the same command resumes.

Prints one JSON line (what was removed, parameters before and after, dev metrics); on a user
error prints one line and exits with status 1; after a SIGTERM during the recovery saves and
exits with status 143 (relaunch to resume); a finished recovery leaves WORKDIR/DONE.
"""

from __future__ import annotations

import json

import jax

from jaxfm import runtime
from jaxfm.compress import prune_run
from jaxfm.finetuning import run as finetuning

_FLAGS = runtime.define_run_flags("The pruned (with a recovery: recovered) model's new workdir, "
                                  "or the one this command stopped in.")


def main(argv):
  del argv
  with runtime.exit_on(finetuning.USER_ERRORS):
    runtime.initialize_runtime()
    runtime.check_paths(_FLAGS.config.value, workdir=_FLAGS.workdir.value)
    outcome = prune_run.prune(_FLAGS.config.value, _FLAGS.workdir.value,
                              _FLAGS.allow_config_change.value)
  if jax.process_index() == 0:
    print(json.dumps(outcome.info))
  if outcome.recovery is not None:
    runtime.finish_training(_FLAGS.workdir.value, outcome.recovery.step,
                            outcome.recovery.preempted)


if __name__ == "__main__":
  runtime.run_program(main)
