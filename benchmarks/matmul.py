"""Matmul rates: the ceiling the step harness's MFU is measured against, and JAX vs torch.

  python -m benchmarks.matmul [--shapes=2048x2048x2048,4096x256x1024] [--reps=10] [--impl=jax,torch]

A shape MxKxN times [M, K] @ [K, N] (2*M*K*N FLOPs), BxMxKxN the batched [B, M, K] @ [B, K, N],
after one warm-up call: the best wall-clock
rate of `--reps` calls, and FLOPs per CPU-second of the process over them (robust to other load
on the machine). Both libraries run in this one process, shape by shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from benchmarks.common import jax_matmul_rate, torch_matmul_rate

# Square ceiling, then the dense shapes of a batch of 32 x 128 tokens: bert-mini QKV and MLP,
# bert-base MLP up/down, the masked-only MLM decoder (640 rows) and the full one (4096 rows), and
# bert-mini's attention (32 x 4 heads): scores [128, 64] @ [64, 128], weighted sum [128, 128] @ V.
_DEFAULT_SHAPES = ("2048x2048x2048,4096x256x768,4096x256x1024,4096x1024x256,4096x768x3072,"
                   "4096x3072x768,640x256x30522,4096x256x30522,128x128x64x128,128x128x128x64")


_SHAPES = flags.DEFINE_string("shapes", _DEFAULT_SHAPES, "Comma-separated MxKxN.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per shape (best is kept).")
_IMPL = flags.DEFINE_list("impl", ["jax", "torch"], "Libraries to time.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Operand dtype.")


def main(argv: Sequence[str]) -> None:
  del argv
  measure = {"jax": jax_matmul_rate, "torch": torch_matmul_rate}
  shapes = [tuple(int(d) for d in s.split("x")) for s in _SHAPES.value.split(",")]
  if bad := [s for s in shapes if len(s) not in (3, 4)]:
    raise app.UsageError(f"--shapes: {bad} are not MxKxN or BxMxKxN")
  print("shape MxKxN".ljust(18) + "".join(f"{impl + ' GFLOP/s, per CPU-s':>28}"
                                          for impl in _IMPL.value))
  for shape in shapes:
    *batch, m, k, n = shape
    rates = [measure[impl](m, k, n, _DTYPE.value, _REPS.value, batch=batch[0] if batch else 0)
             for impl in _IMPL.value]
    print("x".join(map(str, shape)).ljust(18) + "".join(
        f"{r.flops_per_s / 1e9:18.1f}, {r.flops_per_cpu_s / 1e9:7.1f}" for r in rates), flush=True)


if __name__ == "__main__":
  app.run(main)
