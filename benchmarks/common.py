"""What the step harness's children share: the case, its batch, the timing loop, matmul rates.

Deliberately imports neither JAX nor torch, so that each child pays only for its own stack.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import resource
import statistics
import sys
import time
from typing import Any, Callable

import numpy as np

VOCAB_SIZE = 30522
MASK_PROB = 0.15
NUM_LABELS = 2


@dataclasses.dataclass(frozen=True)
class Case:
  """One measurement: an implementation timing one model/task/shape.

  `arch` holds the BERT shape (num_layers, hidden_size, num_heads, intermediate_size);
  `scan_layers` and `remat` apply to jaxfm only, `threads` (0 = library default) to torch only.
  """

  impl: str
  model: str
  task: str
  seq: int
  batch: int
  arch: dict[str, int]
  dtype: str = "float32"
  steps: int = 10
  warmup: int = 2
  scan_layers: bool = False
  remat: str = "none"
  threads: int = 0
  compilation_cache: str = ""
  seed: int = 0

  @property
  def predictions(self) -> int:
    """Predicted (masked) positions per sequence: 15% of the tokens, rounded up (20 at 128)."""
    return math.ceil(MASK_PROB * self.seq)

  @property
  def max_positions(self) -> int:
    return max(512, self.seq)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self))

  @classmethod
  def from_json(cls, text: str) -> "Case":
    return cls(**json.loads(text))


def preset_arch(model: str, layers: int = 0) -> dict[str, int]:
  """The BERT shape of jaxfm's `model` preset for `Case.arch`; `layers` > 0 overrides depth."""
  from jaxfm.models import preset  # pylint: disable=g-import-not-at-top  # jax: jaxfm side only
  config = preset(model)
  arch = {k: getattr(config, k)
          for k in ("num_layers", "hidden_size", "num_heads", "intermediate_size")}
  return {**arch, "num_layers": layers} if layers else arch


def synthetic_batch(case: Case) -> dict[str, np.ndarray]:
  """A full-length batch (no padding) with `predictions` distinct masked positions per row.

  MLM fields follow `jaxfm.data.loader`; `labels` and `weights` [batch] are classification's.
  """
  rng = np.random.default_rng(case.seed)
  shape = (case.batch, case.seq)
  positions = np.sort(np.argsort(rng.random(shape), axis=1)[:, :case.predictions], axis=1)
  return {
      "input_ids": rng.integers(0, VOCAB_SIZE, shape, dtype=np.int32),
      "token_type_ids": np.zeros(shape, np.int32),
      "attention_mask": np.ones(shape, np.int32),
      "masked_positions": positions.astype(np.int32),
      "masked_ids": rng.integers(0, VOCAB_SIZE, positions.shape, dtype=np.int32),
      "masked_weights": np.ones(positions.shape, np.float32),
      "labels": rng.integers(0, NUM_LABELS, case.batch, dtype=np.int32),
      "weights": np.ones(case.batch, np.float32),
  }


_STATUS = pathlib.Path("/proc/self/status")
_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")


def peak_rss_mib() -> float:
  """This process's peak resident set size since it started or since `reset_peak_rss`.

  Linux: VmHWM, not ru_maxrss, which a child started by fork/vfork + exec inherits from its
  parent (the harness's children would report at least the parent's peak). Elsewhere ru_maxrss
  (KiB on Linux, bytes on macOS).
  """
  if _STATUS.exists():
    for line in _STATUS.read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024  # "VmHWM:  123456 kB"
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return maxrss / 2**20 if sys.platform == "darwin" else maxrss / 1024


def reset_peak_rss() -> bool:
  """Sets this process's peak RSS to its current RSS (Linux: "5" to /proc/self/clear_refs).

  Returns False where that is not possible; `peak_rss_mib` then keeps counting from the start.
  """
  try:
    _CLEAR_REFS.write_text("5")
  except OSError:
    return False
  return True


def time_steps(step: Callable[[], None], steps: int, warmup: int) -> dict[str, Any]:
  """Times the first call, runs `warmup` more untimed, then times `steps` calls one by one.

  `step` must return only once its work has finished (block on the device). `cores_busy` is
  this process's CPU seconds per wall second over the timed steps (2.0 = both cores of 2).
  `peak_rss_setup_mib` is the peak RSS before the first call (imports, model, compile, state);
  `peak_rss_steps_mib` the peak from the first call to the last (absent where the peak cannot
  be reset). The process's own peak is the larger of the two as long as nothing runs after.
  """
  peaks = {"peak_rss_setup_mib": peak_rss_mib()}
  steps_peak_is_own = reset_peak_rss()
  start = time.perf_counter()
  step()
  first = time.perf_counter() - start
  for _ in range(warmup):
    step()
  times = []
  cpu = time.process_time()
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  cpu = time.process_time() - cpu
  if steps_peak_is_own:
    peaks["peak_rss_steps_mib"] = peak_rss_mib()
  return {**peaks, "first_step_s": first, "step_s": statistics.median(times),
          "step_s_min": min(times), "step_s_max": max(times), "steps": steps,
          "cpu_s_per_step": cpu / steps, "cores_busy": cpu / sum(times)}


@dataclasses.dataclass(frozen=True)
class Rate:
  """FLOP/s of the fastest timed call, and FLOPs per CPU-second of this process over all calls."""

  flops_per_s: float
  flops_per_cpu_s: float


def _rate(call: Callable[[], None], flops: float, reps: int) -> Rate:
  call()
  best, cpu = float("inf"), time.process_time()
  for _ in range(reps):
    start = time.perf_counter()
    call()
    best = min(best, time.perf_counter() - start)
  return Rate(flops / best, flops * reps / (time.process_time() - cpu))


def jax_matmul_rate(m: int, k: int, n: int, dtype: str = "float32", reps: int = 10,
                    batch: int = 0) -> Rate:
  """A jitted [m, k] @ [k, n] on JAX's default device; [batch, m, k] @ [batch, k, n] if batch."""
  import jax  # pylint: disable=g-import-not-at-top
  lead = (batch,) if batch else ()
  a = jax.random.normal(jax.random.key(0), (*lead, m, k), dtype)
  b = jax.random.normal(jax.random.key(1), (*lead, k, n), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  return _rate(lambda: matmul(a, b).block_until_ready(), 2.0 * max(batch, 1) * m * k * n, reps)


def torch_matmul_rate(m: int, k: int, n: int, dtype: str = "float32", reps: int = 10,
                      batch: int = 0) -> Rate:
  """torch.matmul on the CPU with torch's default intra-op threads (batched if batch)."""
  import torch  # pylint: disable=g-import-not-at-top
  lead = (batch,) if batch else ()
  a = torch.randn(*lead, m, k, dtype=getattr(torch, dtype))
  b = torch.randn(*lead, k, n, dtype=getattr(torch, dtype))
  return _rate(lambda: torch.matmul(a, b), 2.0 * max(batch, 1) * m * k * n, reps)


def ceiling_size(platform: str) -> int:
  """Side of the square ceiling matmul: large enough to saturate the device."""
  return 2048 if platform == "cpu" else 8192
