"""Converts between Hugging Face BERT checkpoints and jaxfm models.

  python -m jaxfm.convert --from_hf=HF_DIR --out=JAXFM_DIR [--task=auto] [--init_missing_head]
  python -m jaxfm.convert --to_hf --from=JAXFM_DIR_OR_WORKDIR --out=HF_DIR

Prints the accounting report; on error prints one line and exits with status 1.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags

from jaxfm import weights, workdir
from jaxfm.interop import checkpoint_dir, hf

flags.DEFINE_string("from_hf", None, "Hugging Face model dir to import.")
flags.DEFINE_bool("to_hf", False, "Export --from to a Hugging Face model dir.")
flags.DEFINE_string("from", None, "jaxfm model dir or training workdir to export (with --to_hf).")
flags.DEFINE_string("out", None, "Destination dir; must not exist or be empty.")
flags.DEFINE_enum("task", "auto", hf.TASKS,
                  "Import as BertForMaskedLM ('mlm'), BertModel ('base'), or 'mlm' exactly "
                  "when the checkpoint has an MLM head ('auto').")
flags.DEFINE_bool("init_missing_head", False,
                  "Initialise a head the checkpoint lacks instead of failing.")
FLAGS = flags.FLAGS


def _from_hf(hf_dir: str, out: str) -> str:
  result = hf.import_hf(hf_dir, task=FLAGS.task, init_missing_head=FLAGS.init_missing_head)
  checkpoint_dir.save_model_dir(out, result.config, result.params,
                                checkpoint_dir.tokenizer_files(hf_dir))
  return f"{result.summary()}\nwrote jaxfm model dir {os.path.abspath(out)}"


def _to_hf(source: str, out: str) -> str:
  config, params, tokenizer_dir, origin = weights.load_jaxfm(source)
  report = hf.export_hf(params, config, out, tokenizer_dir, workdir.label_names(source)).summary()
  return report + (f"\nparams: {origin}" if origin else "")


def _run() -> str:
  source = FLAGS["from"].value
  workdir.require_gcs_support({"--from": source or "", "--from_hf": FLAGS.from_hf or "",
                                "--out": FLAGS.out or ""})
  if not FLAGS.out:
    raise ValueError("--out is required")
  if FLAGS.to_hf == bool(FLAGS.from_hf):
    raise ValueError("give exactly one of --from_hf=HF_DIR or --to_hf --from=DIR")
  if FLAGS.from_hf:
    if source:
      raise ValueError("--from goes with --to_hf; use --from_hf=HF_DIR to import")
    return _from_hf(FLAGS.from_hf, FLAGS.out)
  if not source:
    raise ValueError("--to_hf needs --from=JAXFM_DIR_OR_WORKDIR")
  return _to_hf(source, FLAGS.out)


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
