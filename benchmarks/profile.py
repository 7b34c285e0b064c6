r"""Where jaxfm's train step spends its time, by kind of XLA operation.

  python -m benchmarks.profile --model=mini --task=cls [--seq=128 --batch=32 --steps=3]

Traces `--steps` steps of the real train step (as `benchmarks.step` builds it) with the JAX
profiler and sums the per-thunk times of XLA's CPU runtime by kind, read from the compiled HLO:
dense GEMMs (rank-2 dot outputs), batched GEMMs (attention scores and weighted sums), random
bits for dropout (u32 outputs), copies and transposes, and the rest (elementwise, reductions).
Thunks can overlap, so the kinds can add up to more than the step's wall time; the table also
prints the wall time and the thunk time over it (the parallelism XLA found between thunks).
Dots on XLA's Eigen path (jaxfm's default XLA flags, from bert-mini's width up) leave no thunk
events, so there the thunk time falls well below the wall time; run with
`XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce` to see the GEMMs.
"""

from __future__ import annotations

import collections
import statistics
import tempfile
import time
from collections.abc import Sequence

import jax
from absl import flags

from benchmarks import common, jaxfm_impl, xla_ops
from jaxfm import runtime

_MODEL = flags.DEFINE_string("model", "mini", "BERT size preset: tiny, mini, small, base, large.")
_TASK = flags.DEFINE_enum("task", "cls", ["mlm", "cls"], "MLM pretraining or classification.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 3, "Traced steps (after 3 untimed ones).")

def main(argv: Sequence[str]) -> None:
  del argv
  case = jaxfm_impl.cpu_case(_MODEL.value, _TASK.value, _SEQ.value, _BATCH.value)
  step = jaxfm_impl.compile_train_step(case, common.synthetic_batch(case))
  kinds = xla_ops.op_kinds(step.compiled.as_text())
  for _ in range(3):
    step.run()
  walls = []
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(_STEPS.value):
      start = time.perf_counter()
      step.run()
      walls.append(time.perf_counter() - start)
    jax.profiler.stop_trace()
    times = xla_ops.thunk_times(trace_dir)
  by_kind = collections.Counter()
  for op, us in times.items():
    by_kind[kinds.get(op, xla_ops.OTHER)] += us / 1e3 / _STEPS.value
  wall_ms = statistics.median(walls) * 1e3
  total = sum(by_kind.values())
  print(f"{case.model} {case.task} seq {case.seq} batch {case.batch}: {wall_ms:.0f} ms/step "
        f"(traced), thunk time {total:.0f} ms/step = {total / wall_ms:.2f}x wall")
  print(f"{'kind':34s} {'ms/step':>8s} {'share':>6s}")
  for kind, ms in by_kind.most_common():
    print(f"{kind:34s} {ms:8.1f} {ms / total:6.1%}")


if __name__ == "__main__":
  runtime.run_program(main)
