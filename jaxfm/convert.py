"""Converts between Hugging Face BERT checkpoints and jaxfm models.

  python -m jaxfm.convert --from_hf=HF_DIR --out=JAXFM_DIR [--task=auto] [--init_missing_head]
  python -m jaxfm.convert --from_hf=HF_DIR --out=WORKDIR --task=classification|ner|qa
  python -m jaxfm.convert --to_hf --from=JAXFM_DIR_OR_WORKDIR --out=HF_DIR
  python -m jaxfm.convert --to_peft --from=WORKDIR --out=ADAPTER_DIR
  python -m jaxfm.convert --from_peft=ADAPTER_DIR --base=HF_DIR --out=WORKDIR [--labels=a,b]

--task=classification (BertForSequenceClassification; regression for one output), ner
(BertForTokenClassification) or qa (BertForQuestionAnswering) imports a fine-tuned task model as
a jaxfm fine-tuning workdir, its best checkpoint at step 0: evaluate (with --input), predict,
quantize, prune, distill (as --config.teacher) and --to_hf take it as a run.

A parameter-efficient workdir (`peft.method`) exports with --to_hf as the merged model (the
adapter folded into its base) and with --to_peft as a huggingface/peft adapter folder;
--from_peft reads a peft LoRA folder for the BERT at --base into such a workdir (evaluate it with
--input, predict, or export it).

An int8 folder (`jaxfm.quantize`) or a quantization-aware workdir (`quantize.qat`) exports
with --to_hf as the weights its int8 model computes with (int8 x scale), in float32:
transformers then computes what jaxfm's weight_only int8 model does. w8a8 also rounds each
matmul's activations, which a Hugging Face folder cannot hold; the report says so.

Prints the accounting report; on error prints one line and exits with status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags
from etils import epath

from jaxfm import compress, weights, workdir
from jaxfm.finetuning import run
from jaxfm.interop import checkpoint_dir, hf, hf_task_import, peft_format, peft_import

flags.DEFINE_string("from_hf", None, "Hugging Face model dir to import.")
flags.DEFINE_bool("to_hf", False, "Export --from to a Hugging Face model dir.")
flags.DEFINE_bool("to_peft", False,
                  "Export the parameter-efficient workdir --from as a peft adapter folder.")
flags.DEFINE_string("from_peft", None,
                    "huggingface/peft LoRA adapter folder to import as a jaxfm workdir.")
flags.DEFINE_string("base", None, "With --from_peft: the Hugging Face BERT folder it adapts.")
flags.DEFINE_list("labels", None,
                  "With --from_peft: the head's label names in output order (default 0 ... n-1).")
flags.DEFINE_string("from", None,
                    "jaxfm model dir or training workdir to export (with --to_hf or --to_peft).")
flags.DEFINE_string("out", None, "Destination dir; must not exist or be empty.")
flags.DEFINE_enum("task", "auto", hf.TASKS + tuple(hf.TASK_HEADS),
                  "Import as BertForMaskedLM ('mlm'), BertModel ('base'), or 'mlm' exactly "
                  "when the checkpoint has an MLM head ('auto'), into a model dir; or a "
                  "fine-tuned BertForSequenceClassification ('classification'), "
                  "BertForTokenClassification ('ner') or BertForQuestionAnswering ('qa') into "
                  "a fine-tuning workdir.")
flags.DEFINE_bool("init_missing_head", False,
                  "Initialise a head the checkpoint lacks instead of failing.")
FLAGS = flags.FLAGS


def _from_hf(hf_dir: str, out: str) -> str:
  if FLAGS.task in hf.TASK_HEADS:
    if FLAGS.init_missing_head:
      raise ValueError(f"--init_missing_head goes with --task={'|'.join(hf.TASKS)}: a "
                       f"--task={FLAGS.task} checkpoint brings its fine-tuned head")
    return hf_task_import.import_workdir(hf_dir, out, FLAGS.task)
  result = hf.import_hf(hf_dir, task=FLAGS.task, init_missing_head=FLAGS.init_missing_head)
  checkpoint_dir.save_model_dir(out, result.config, result.params,
                                checkpoint_dir.tokenizer_files(hf_dir))
  return f"{result.summary()}\nwrote jaxfm model dir {os.path.abspath(out)}"


def _run_config(source: str) -> ml_collections.ConfigDict | None:
  """The resolved config of the workdir (or int8 folder) `source`; None for a model dir."""
  if not (epath.Path(source) / workdir.CONFIG_FILE).exists():  # local or gs://
    return None
  return workdir.read_config(source)


def _int8_grid(source: str) -> tuple[Any, str]:
  """The float32 params the int8 model of `source` computes with, and what they are."""
  model = compress.int8_model(source)
  origin = f"{model.describe()}, dequantized (int8 x scale)"
  if model.mode == "w8a8":
    origin += ("\nnote: w8a8 also rounds each matmul's activations to int8 per token, which a "
               "Hugging Face folder cannot hold: transformers computes with these weights on "
               "float activations, as jaxfm.quantize --mode=weight_only runs them")
  return model.dequantized(), origin


def _to_hf(source: str, out: str) -> str:
  cfg = _run_config(source)
  if cfg is not None and run.is_peft_run(cfg):
    parts = run.adapted(source)
    if not parts.plan.method.folds:
      raise ValueError(f"peft.method={parts.plan.method.name!r} adds to the model rather than "
                       "to its weights, so it has no merged form: export it with --to_peft")
    params = jax.device_get(jax.jit(parts.plan.merge)(parts.trainable, parts.frozen))
    config = workdir.read_model_config(source)
    tokenizer_dir, origin = str(workdir.tokenizer_dir(source)), f"{parts.source} merged"
  elif cfg is not None and compress.runs_int8(source, cfg):
    params, origin = _int8_grid(source)
    config, tokenizer_dir = workdir.read_model_config(source), str(workdir.tokenizer_dir(source))
  else:
    config, params, tokenizer_dir, origin = weights.load_jaxfm(source)
  report = hf.export_hf(params, config, out, tokenizer_dir, workdir.label_names(source)).summary()
  return report + (f"\nparams: {origin}" if origin else "")


def _to_peft(source: str, out: str) -> str:
  parts = run.adapted(source)
  config = workdir.read_model_config(source)
  if config.pruned_heads and parts.plan.method.name != "prompt":
    raise ValueError(f"{source} adapts a head-pruned model (model.pruned_heads="
                     f"{[list(heads) for heads in config.pruned_heads]}): transformers holds "
                     f"its pruned heads as zeros at full width, which peft's "
                     f"{parts.plan.method.name} tensors would have to match, so the adapter has "
                     "no peft form; export the merged model with --to_hf")
  init_from = parts.run.cfg.init_from
  report = peft_format.export_peft(parts.plan, parts.trainable, parts.frozen, config, out,
                                   init_from[3:] if init_from.startswith("hf:") else "",
                                   parts.run.label_names, parts.run.cfg.train.steps)
  return f"{report}\nparams: {parts.source}"


def _run() -> str:
  source = FLAGS["from"].value
  workdir.require_gcs_support({"--from": source or "", "--from_hf": FLAGS.from_hf or "",
                                "--from_peft": FLAGS.from_peft or "", "--base": FLAGS.base or "",
                                "--out": FLAGS.out or ""})
  if not FLAGS.out:
    raise ValueError("--out is required")
  if FLAGS.to_hf + FLAGS.to_peft + bool(FLAGS.from_hf) + bool(FLAGS.from_peft) != 1:
    raise ValueError("give exactly one of --from_hf=HF_DIR, --to_hf --from=DIR, "
                     "--to_peft --from=WORKDIR or --from_peft=ADAPTER_DIR --base=HF_DIR")
  if bool(FLAGS.from_peft) != bool(FLAGS.base):
    raise ValueError("--from_peft=ADAPTER_DIR and --base=HF_DIR go together")
  if (FLAGS.from_hf or FLAGS.from_peft) and source:
    raise ValueError("--from goes with --to_hf / --to_peft; import with --from_hf=HF_DIR or "
                     "--from_peft=ADAPTER_DIR")
  if FLAGS.from_peft:
    return peft_import.import_workdir(FLAGS.from_peft, FLAGS.base, FLAGS.out, FLAGS.labels)
  if FLAGS.from_hf:
    return _from_hf(FLAGS.from_hf, FLAGS.out)
  if not source:
    raise ValueError("--to_hf / --to_peft need --from=JAXFM_DIR_OR_WORKDIR")
  return _to_peft(source, FLAGS.out) if FLAGS.to_peft else _to_hf(source, FLAGS.out)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Conversion is host work: never take an accelerator a training job may be using.
  jax.config.update("jax_platforms", "cpu")
  try:
    print(_run())
  except (ValueError, OSError, RuntimeError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
