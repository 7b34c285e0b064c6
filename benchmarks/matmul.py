"""Matmul rates: the ceiling the step harness's MFU is measured against, and JAX vs torch.

  python -m benchmarks.matmul [--shapes=2048x2048x2048,4096x256x1024] [--reps=10] [--impl=jax,torch]

A shape MxKxN times [M, K] @ [K, N]; each rate is the best of `--reps` timed calls after one
warm-up, 2*M*K*N FLOPs per call. Both libraries run in this one process, one after the other.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from benchmarks.common import jax_matmul_flops, torch_matmul_flops

# Square ceiling, then the dense shapes of a batch of 32 x 128 tokens: bert-mini QKV and MLP,
# bert-base MLP up/down, the masked-only MLM decoder (640 rows) and the full one (4096 rows).
_DEFAULT_SHAPES = ("2048x2048x2048,4096x256x768,4096x256x1024,4096x1024x256,4096x768x3072,"
                   "4096x3072x768,640x256x30522,4096x256x30522")


_SHAPES = flags.DEFINE_string("shapes", _DEFAULT_SHAPES, "Comma-separated MxKxN.")
_REPS = flags.DEFINE_integer("reps", 10, "Timed calls per shape (best is kept).")
_IMPL = flags.DEFINE_list("impl", ["jax", "torch"], "Libraries to time.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Operand dtype.")


def main(argv: Sequence[str]) -> None:
  del argv
  rate = {"jax": jax_matmul_flops, "torch": torch_matmul_flops}
  shapes = [tuple(int(d) for d in s.split("x")) for s in _SHAPES.value.split(",")]
  results = {impl: [rate[impl](*shape, _DTYPE.value, _REPS.value) for shape in shapes]
             for impl in _IMPL.value}
  print("shape MxKxN".ljust(18) + "".join(f"{impl + ' GFLOP/s':>16}" for impl in _IMPL.value))
  for i, shape in enumerate(shapes):
    print("x".join(map(str, shape)).ljust(18)
          + "".join(f"{results[impl][i] / 1e9:16.1f}" for impl in _IMPL.value))


if __name__ == "__main__":
  app.run(main)
