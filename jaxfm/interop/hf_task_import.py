"""A fine-tuned Hugging Face BERT task model imported as a jaxfm fine-tuning workdir.

`BertForSequenceClassification` (task classification, or regression for one output),
`BertForTokenClassification` (ner) and `BertForQuestionAnswering` (qa) become the workdir of
that jaxfm task: encoder and head as its best checkpoint at step 0, labels from config.json's
`id2label`, the folder's tokenizer (`imported_workdir`). `convert --to_hf` writes it back.
"""

from __future__ import annotations

import os

import jax

from jaxfm import config as config_lib
from jaxfm import sharding, weights
from jaxfm.interop import hf, imported_workdir
from jaxfm.interop.hf_names import InteropError
from jaxfm.tasks import make_task
from jaxfm.trees import flatten

_MAX_SHOWN = 12


def _check_task_params(flat: dict, expected: dict) -> None:
  """Refuses params whose names or shapes differ from the jaxfm task model's."""
  problems = [f"{p} is not a param of the task model" for p in sorted(set(flat) - set(expected))]
  problems += [f"the task model's {p} is missing" for p in sorted(set(expected) - set(flat))]
  problems += [f"{p} has shape {flat[p].shape}, the task model's {tuple(expected[p].shape)}"
               for p in sorted(set(flat) & set(expected))
               if tuple(flat[p].shape) != tuple(expected[p].shape)]
  if problems:
    raise InteropError(f"the imported params do not fit jaxfm's task model: "
                       f"{'; '.join(problems[:_MAX_SHOWN])}")


def import_workdir(hf_dir: str, out: str, task: str) -> str:
  """Writes the jaxfm fine-tuning workdir `out` for the HF task model at `hf_dir` (`task`: a
  key of `hf.TASK_HEADS`); returns the accounting report.

  Raises:
    InteropError: another architecture, labels that do not fit the head, no tokenizer files,
      unaccounted tensors, a non-empty `out`.
  """
  imported_workdir.require_empty(out)
  result = hf.import_hf_task(hf_dir, task)
  cfg = imported_workdir.run_config(result.task, f"hf:{os.path.abspath(hf_dir)}", result.config)
  tokenizer = imported_workdir.hf_tokenizer(hf_dir, cfg)
  model_config = config_lib.bert_config(cfg, "cpu")
  params = weights.in_layout(result.params, model_config)
  jaxfm_task = make_task(cfg.task, model_config, result.label_names, None, cfg.data)
  expected = sharding.unbox(jax.eval_shape(jaxfm_task.init_params, jax.random.key(0)))
  _check_task_params(flatten(params), flatten(expected))
  imported_workdir.write(out, cfg, result.label_names, tokenizer, params)
  labels = f", labels {result.label_names}" if result.label_names else ""
  return (f"{result.summary()}\nwrote the {cfg.task} workdir {os.path.abspath(out)} (best "
          f"checkpoint at step 0{labels}, data.max_seq_length={cfg.data.max_seq_length})")
