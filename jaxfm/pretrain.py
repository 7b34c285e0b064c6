r"""MLM pretraining.

  python -m jaxfm.pretrain --config=configs/pretrain/bert_tiny_cpu.py --workdir=runs/tiny \
      [--config.train.steps=100 ...]

Running the same command again in the same workdir resumes where it stopped.
"""

from __future__ import annotations

import sys

from absl import flags, logging
from ml_collections import config_flags

from jaxfm import runtime
from jaxfm.pretraining.run import USER_ERRORS, pretrain, report

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and the run's tokenizer.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume even though the config differs from the saved one.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  runtime.initialize_runtime(_CONFIG.value.model.hidden_size)
  try:
    runtime.use_compilation_cache(_WORKDIR.value)
    result = pretrain(_CONFIG.value, _WORKDIR.value, _ALLOW_CONFIG_CHANGE.value)
  except USER_ERRORS as e:
    logging.error("%s", e)
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  report(_WORKDIR.value, result)


def run():
  runtime.run_program(main)


if __name__ == "__main__":
  run()
