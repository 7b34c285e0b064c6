r"""Structured pruning's trade: dev accuracy, parameters and CPU eval time of fine-tuning
workdirs, e.g. a fine-tuned model and the `python -m jaxfm.prune` workdirs made from it.

  python -m benchmarks.prune --workdirs=runs/sst2,runs/sst2_p25,runs/sst2_p50 [--repeats=3]

Each workdir is scored as `jaxfm.evaluate` scores it (its best params, its dev split, its eval
batches and length buckets). Eval time: one pass over the split after a warm-up pass (compiles
excluded), the median of `--repeats`, the workdirs interleaved. One JSON line per workdir.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import app, flags

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm import workdir as workdir_lib
from jaxfm.finetuning import run
from jaxfm.tasks import load_split
from jaxfm.train import loop

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Fine-tuning workdirs to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per workdir.")
flags.mark_flags_as_required(["workdirs"])


def _job(workdir: str) -> tuple[run.Inference, Callable[[], dict[str, float]]]:
  saved = workdir_lib.load_run(workdir)
  split, _ = load_split(saved.cfg.task, saved.cfg.data, run.split_path(saved.cfg.data, "dev"),
                        saved.tokenizer.backend, saved.label_names)
  job = run.inference(workdir, saved, split)

  def one_pass() -> dict[str, float]:
    with sharding.activation_sharding(job.mesh):
      return loop.evaluate(job.task, job.steps, job.params, job.batches(), job.mesh)
  return job, one_pass


def measure() -> list[dict[str, Any]]:
  jobs = {workdir: _job(workdir) for workdir in _WORKDIRS.value}
  results = {workdir: one_pass() for workdir, (_, one_pass) in jobs.items()}  # warm-up
  seconds: dict[str, list[float]] = {workdir: [] for workdir in jobs}
  for _ in range(_REPEATS.value):
    for workdir, (_, one_pass) in jobs.items():
      start = time.perf_counter()
      one_pass()
      seconds[workdir].append(time.perf_counter() - start)
  rows = []
  for workdir, (job, _) in jobs.items():
    config = config_lib.bert_config(job.run.cfg, None)
    eval_s = statistics.median(seconds[workdir])
    rows.append({"workdir": workdir,
                 "heads": [config.layer_heads(i) for i in range(config.num_layers)],
                 "intermediate_size": config.intermediate_size,
                 "params": int(sum(np.size(x) for x in jax.tree.leaves(job.params))),
                 "accuracy": float(results[workdir]["accuracy"]), "eval_s": eval_s,
                 "examples_per_s": len(job.split.examples) / eval_s,
                 "cpu_threads": os.cpu_count()})
  return rows


def main(argv: list[str]) -> None:
  del argv
  for row in measure():
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
