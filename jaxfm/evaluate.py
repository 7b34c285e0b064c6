r"""Scores a fine-tuning workdir's best checkpoint on a split.

  python -m jaxfm.evaluate --workdir=runs/sst2 --split=dev [--input=other_dev.tsv]

Prints one JSON line of metrics. Needs only the workdir: its config, labels and tokenizer
are read from there.
"""

from __future__ import annotations

import json

import jax
from absl import flags

from jaxfm import runtime
from jaxfm.finetuning import run

_WORKDIR = flags.DEFINE_string("workdir", None, "A jaxfm fine-tuning workdir, or an int8 folder "
                                "written by jaxfm.quantize.")
_SPLIT = flags.DEFINE_enum("split", "dev", ["train", "dev", "test"],
                           "Which configured split to score.")
_INPUT = flags.DEFINE_string("input", "", "Score this file instead of the split's configured one.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  runtime.initialize_runtime()
  with runtime.exit_on(run.USER_ERRORS):
    runtime.check_paths(workdir=_WORKDIR.value, input=_INPUT.value)
    metrics = run.evaluate(_WORKDIR.value, _SPLIT.value, _INPUT.value)
  if jax.process_index() == 0:
    print(json.dumps(metrics))


if __name__ == "__main__":
  runtime.run_program(main)
