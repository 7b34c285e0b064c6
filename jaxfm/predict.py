r"""Predictions of a fine-tuning workdir's best checkpoint on new inputs.

  python -m jaxfm.predict --workdir=runs/sst2 --input=new.jsonl --output=preds.jsonl

Input: JSONL, one object per line. Classification / regression: the run's text fields
(`data.text_fields`, e.g. {"sentence": ...}); NER: {"tokens": [...words]}; QA: {"id",
"question", "context"}. Output: JSONL in input order (label + probabilities, score, tags or
answer), written atomically.
"""

from __future__ import annotations


import jax
from absl import flags

from jaxfm import runtime
from jaxfm.finetuning import run

_WORKDIR = flags.DEFINE_string("workdir", None, "A jaxfm fine-tuning workdir, or an int8 folder "
                                "written by jaxfm.quantize.")
_INPUT = flags.DEFINE_string("input", None, "JSONL inputs.")
_OUTPUT = flags.DEFINE_string("output", None, "JSONL predictions.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def main(argv):
  del argv
  runtime.initialize_runtime()
  with runtime.exit_on(run.USER_ERRORS):
    runtime.check_paths(workdir=_WORKDIR.value, input=_INPUT.value, output=_OUTPUT.value)
    rows = run.predict(_WORKDIR.value, _INPUT.value)
  if jax.process_index() == 0:
    run.write_jsonl(rows, _OUTPUT.value)
    print(f"wrote {len(rows)} predictions to {_OUTPUT.value}")


if __name__ == "__main__":
  runtime.run_program(main)
