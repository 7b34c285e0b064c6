r"""MLM pretraining.

  python -m jaxfm.pretrain --config=configs/pretrain/bert_tiny_cpu.py --workdir=runs/tiny \
      [--config.train.steps=100 ...]

Running the same command again in the same workdir resumes where it stopped. Exit status: 0
when `train.steps` is reached (the workdir then holds DONE), 143 after a SIGTERM save (relaunch
to resume), 1 on a user error.
"""

from __future__ import annotations

from jaxfm import runtime
from jaxfm.pretraining.run import USER_ERRORS, pretrain, report

_FLAGS = runtime.define_run_flags("Checkpoints, logs and the run's tokenizer.")


def main(argv):
  del argv
  cfg, workdir = _FLAGS.config.value, _FLAGS.workdir.value
  runtime.initialize_runtime(cfg.model.hidden_size)
  with runtime.exit_on(USER_ERRORS):
    runtime.check_paths(cfg, workdir=workdir)
    runtime.use_compilation_cache(workdir)
    result = pretrain(cfg, workdir, _FLAGS.allow_config_change.value)
  report(workdir, result)
  runtime.finish_training(workdir, result.step, result.preempted)


def run():
  runtime.run_program(main)


if __name__ == "__main__":
  run()
