r"""In-process A/B of two model configs of jaxfm's real train step, steps alternating A B A B.

  python -m benchmarks.ab --model=tiny --task=mlm --a=loss_vocab_chunk=0 --b=loss_vocab_chunk=4096

One process compiles the train step twice (`--a` and `--b` override `BertConfig` fields,
comma-separated `name=value`; empty = the preset) and then runs them alternately, so both see
the same machine state: on a shared or throttled VM this resolves differences of a few per cent
that separate processes (`benchmarks.step`) cannot. Prints each variant's median and fastest
step and the median of the per-pair ratios time A / time B (> 1: B is faster). Time only; peak RSS
and compile figures need one process per variant (`benchmarks.step`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import common, jaxfm_impl
from jaxfm import runtime
from jaxfm.models import BertConfig

_MODEL = flags.DEFINE_string("model", "mini", "BERT size preset: tiny, mini, small, base, large.")
_TASK = flags.DEFINE_enum("task", "cls", ["mlm", "cls"], "MLM pretraining or classification.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_A = flags.DEFINE_string("a", "", "Variant A: BertConfig overrides, e.g. 'loss_vocab_chunk=0'.")
_B = flags.DEFINE_string("b", "", "Variant B: BertConfig overrides.")
_PAIRS = flags.DEFINE_integer("pairs", 10, "Timed (A, B) step pairs, after 2 untimed steps each.")


def parse_overrides(text: str) -> dict[str, Any]:
  """'name=value,...' -> {name: value} typed like the BertConfig field; errors name the field."""
  fields = {f.name: f for f in dataclasses.fields(BertConfig)}
  overrides = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or name not in fields:
      raise app.UsageError(f"{item!r}: expected NAME=VALUE with NAME a BertConfig field")
    kind = type(fields[name].default)
    if kind is bool:
      overrides[name] = value.lower() in ("1", "true", "yes")
    else:
      try:
        overrides[name] = kind(value)
      except ValueError:
        raise app.UsageError(f"{item!r}: not a valid {kind.__name__} for {name}") from None
  return overrides


def main(argv: Sequence[str]) -> None:
  del argv
  case = jaxfm_impl.cpu_case(_MODEL.value, _TASK.value, _SEQ.value, _BATCH.value)
  batch = common.synthetic_batch(case)
  variants = {"A": parse_overrides(_A.value), "B": parse_overrides(_B.value)}
  steps = {name: jaxfm_impl.compile_train_step(case, batch, overrides)
           for name, overrides in variants.items()}
  for step in steps.values():
    step.run()
    step.run()
  times: dict[str, list[float]] = {name: [] for name in steps}
  for _ in range(_PAIRS.value):
    for name, step in steps.items():
      start = time.perf_counter()
      step.run()
      times[name].append(time.perf_counter() - start)
  print(f"{case.model} {case.task} seq {case.seq} batch {case.batch}, {_PAIRS.value} pairs")
  for name, overrides in variants.items():
    print(f"  {name} {overrides or '(preset)'}: median {statistics.median(times[name]) * 1e3:.1f} "
          f"ms, fastest {min(times[name]) * 1e3:.1f} ms")
  ratios = [a / b for a, b in zip(times["A"], times["B"])]
  print(f"  time A / time B per pair: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
  runtime.run_program(main)
