"""Train-step throughput of jaxfm beside transformers' PyTorch BERT, interleaved in one run.

  python -m benchmarks.step --model=mini --task=mlm --seq=128 --batch=32 [--impl=jaxfm|torch]
      [--steps=10] [--rounds=2] [--dtype=bfloat16] [--json]

Each measurement runs in its own child process (clean compile caches; its own peak RSS). Without
`--impl` every round runs jaxfm then torch (A B A B ...) and the table gives the per-pair
jaxfm/torch tokens/s ratio. First a JAX child measures the matmul ceiling (best of
`--matmul_reps` square matmuls in `--dtype`, with JAX's stock XLA flags) that MFU is reported
against; jaxfm children run with jaxfm's default XLA flags (`jaxfm.cpu.process.DEFAULT_XLA_FLAGS`).
Every child runs with glibc's malloc in transparent huge pages, as jaxfm's entry points restart
themselves (`jaxfm.cpu.process.restart_with_hugepage_malloc`); `GLIBC_TUNABLES=glibc.malloc.hugetlb=0`
runs them all without.

FLOPs per token (`jaxfm.train.flops`) are what each implementation computes: jaxfm runs the MLM
head at the masked positions only, the HF model at every position (its loss ignores the rest);
jaxfm's classifier runs its last layer at the pooled first position only (unrolled stack), the
HF model at every position.
`mfu` is achieved FLOP/s over the ceiling's best FLOP/s; `mfu_cpu` is achieved FLOPs per CPU-second
of the child over the ceiling matmul's FLOPs per CPU-second, which holds up better when other
processes share the cores (`cores_busy` = the child's CPU-seconds per wall second).
With `--json`, stdout holds one JSON line per measurement and the table goes to stderr.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import common

_ROOT = pathlib.Path(__file__).resolve().parents[1]
IMPLS = ("jaxfm", "torch")
_MODEL = flags.DEFINE_string("model", "tiny", "BERT size preset: tiny, mini, small, base, large.")
_TASK = flags.DEFINE_enum("task", "mlm", ["mlm", "cls"], "MLM pretraining or classification.")
_SEQ = flags.DEFINE_integer("seq", 128, "Sequence length.")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size (sequences per step).")
_IMPL = flags.DEFINE_enum("impl", None, list(IMPLS), "One implementation (default: both).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after the first one.")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "Rounds of (jaxfm, torch) measurements.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Compute dtype (bfloat16 on GPU/TPU); params stay float32.")
_LAYERS = flags.DEFINE_integer("layers", 0, "Override the preset's depth (0 = keep).")
_SCAN = flags.DEFINE_bool("scan_layers", False, "jaxfm: nn.scan over layers.")
_REMAT = flags.DEFINE_enum("remat", "none", ["none", "full", "dots", "dots_no_batch"],
                           "jaxfm: rematerialisation policy.")
_XLA_FLAGS = flags.DEFINE_string("xla_flags", "", "jaxfm: appended to XLA_FLAGS.")
_DEVICES = flags.DEFINE_integer("devices", 0, "jaxfm on CPU: fake host devices (0 = default).")
_CACHE = flags.DEFINE_string("compilation_cache", "", "jaxfm: persistent compilation cache dir.")
_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0 = default).")
_MATMUL_REPS = flags.DEFINE_integer("matmul_reps", 10, "Timed calls of the ceiling matmul.")
_JSON = flags.DEFINE_bool("json", False, "One JSON line per measurement on stdout.")
_CHILD = flags.DEFINE_string("child", "", "Internal: run one measurement (a Case as JSON).")
_CEILING_CHILD = flags.DEFINE_bool("ceiling_child", False, "Internal: measure the ceiling.")


def _child_env() -> dict[str, str]:
  """Every child's environment: this one, with glibc's malloc in huge pages as jaxfm's entry
  points run (`jaxfm.cpu.process.hugepage_malloc_env`; GLIBC_TUNABLES=glibc.malloc.hugetlb=0 runs
  every child without)."""
  from jaxfm.cpu import process as cpu_process  # pylint: disable=g-import-not-at-top
  return cpu_process.hugepage_malloc_env(os.environ) or dict(os.environ)


def _jax_env(case: common.Case | None) -> dict[str, str]:
  """The environment of a JAX child: XLA_FLAGS plus --xla_flags and --devices, and for a jaxfm
  `case` jaxfm's default XLA flags for its width (as its entry points set them; None: the
  ceiling child, which keeps JAX's stock flags)."""
  from jaxfm.cpu import process as cpu_process  # pylint: disable=g-import-not-at-top
  xla = " ".join(f for f in [os.environ.get("XLA_FLAGS", ""), _XLA_FLAGS.value] if f)
  if _DEVICES.value:
    xla += f" --xla_force_host_platform_device_count={_DEVICES.value}"
  if case is not None:
    xla = cpu_process.with_default_xla_flags(xla, case.arch["hidden_size"])
  return {**_child_env(), "XLA_FLAGS": xla.strip()}


def _run_child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
  proc = subprocess.run([sys.executable, "-m", "benchmarks.step", *args], cwd=_ROOT, env=env,
                        capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    raise RuntimeError(f"child {args} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1])


def flops_per_token(case: common.Case) -> float:
  """Training FLOPs per token that `case.impl` performs (see the module docstring)."""
  from jaxfm.models import BertConfig  # pylint: disable=g-import-not-at-top
  from jaxfm.train import flops  # pylint: disable=g-import-not-at-top
  config = BertConfig(**case.arch, vocab_size=common.VOCAB_SIZE)
  if case.task == "cls":
    if case.impl == "jaxfm":
      return flops.classification_flops_per_token(config, case.seq)
    return flops.encoder_flops_per_token(config, case.seq)
  predicted = case.predictions if case.impl == "jaxfm" else case.seq
  return flops.mlm_flops_per_token(config, case.seq, predicted)


def measure(case: common.Case, ceiling: dict[str, Any], round_index: int) -> dict[str, Any]:
  """Runs `case` in a child and returns its record with tokens/s, FLOPs and MFU."""
  env = _jax_env(case) if case.impl == "jaxfm" else _child_env()
  result = _run_child([f"--child={case.to_json()}"], env)
  tokens_per_s = case.batch * case.seq / result["step_s"]
  fpt = flops_per_token(case)
  chips = 1 if ceiling["platform"] == "cpu" else result["devices"]
  record = {
      "impl": case.impl, "model": case.model, "task": case.task, "seq": case.seq,
      "batch": case.batch, "tokens_per_s": tokens_per_s, "step_s": result.pop("step_s"),
      "compile_s": result.pop("compile_s"), "peak_rss_mib": result.pop("peak_rss_mib"),
      "mfu": tokens_per_s * fpt / (ceiling["matmul_flops"] * chips),
      "first_step_s": result.pop("first_step_s"), "flops_per_token": fpt,
      "matmul_ceiling_flops": ceiling["matmul_flops"],
      "mfu_cpu": (case.batch * case.seq * fpt / result["cpu_s_per_step"]
                  / ceiling["matmul_flops_per_cpu_s"]),
      "dtype": case.dtype, "round": round_index, "glibc_tunables": env.get("GLIBC_TUNABLES", ""),
      "num_layers": case.arch["num_layers"],
  }
  if case.task == "mlm":
    record["predictions_per_seq"] = case.predictions if case.impl == "jaxfm" else case.seq
  if case.impl == "jaxfm":
    record.update(scan_layers=case.scan_layers, remat=case.remat,
                  xla_flags=env["XLA_FLAGS"], compilation_cache=case.compilation_cache)
  return {**record, **result}


def _table(records: list[dict[str, Any]], ceiling: dict[str, Any]) -> str:
  head = (f"{'impl':6} {'round':>5} {'tokens/s':>9} {'step s':>7} {'compile s':>9} "
          f"{'first s':>7} {'RSS MiB':>8} {'steps':>6} {'MFU':>6} {'cores':>5} {'MFU/CPU-s':>9}")
  rows = [f"matmul ceiling ({ceiling['dtype']}, {ceiling['platform']}, JAX, "
          f"n={ceiling['n']}): {ceiling['matmul_flops'] / 1e9:,.1f} GFLOP/s, "
          f"{ceiling['matmul_flops_per_cpu_s'] / 1e9:,.1f} GFLOP per CPU-second", head]
  rows += [f"{r['impl']:6} {r['round']:5d} {r['tokens_per_s']:9,.0f} {r['step_s']:7.3f} "
           f"{r['compile_s']:9.2f} {r['first_step_s']:7.2f} {r['peak_rss_mib']:8,.0f} "
           f"{r.get('peak_rss_steps_mib', float('nan')):6,.0f} {r['mfu']:6.1%} "
           f"{r['cores_busy']:5.2f} {r['mfu_cpu']:9.1%}" for r in records]
  pairs = [(a, b) for a, b in zip(records[::2], records[1::2])
           if (a["impl"], b["impl"]) == IMPLS]
  comparisons = (("tokens/s", "tokens_per_s", 1), ("tokens per CPU-second", "cpu_s_per_step", -1),
                 ("peak RSS", "peak_rss_mib", 1),
                 ("peak RSS during the steps", "peak_rss_steps_mib", 1))
  for name, field, power in comparisons:
    ratios = [(a[field] / b[field]) ** power for a, b in pairs if field in a and field in b]
    if ratios:
      rows.append(f"jaxfm/torch {name} per pair: median {statistics.median(ratios):.2f} "
                  f"(min {min(ratios):.2f}, max {max(ratios):.2f}, {len(ratios)} pairs)")
  return "\n".join(rows)


def _child_main() -> None:
  if _CEILING_CHILD.value:
    import jax  # pylint: disable=g-import-not-at-top
    platform = jax.devices()[0].platform
    n = common.ceiling_size(platform)
    rate = common.jax_matmul_rate(n, n, n, _DTYPE.value, _MATMUL_REPS.value)
    result = dict(matmul_flops=rate.flops_per_s, matmul_flops_per_cpu_s=rate.flops_per_cpu_s,
                  n=n, platform=platform, dtype=_DTYPE.value)
  else:
    case = common.Case.from_json(_CHILD.value)
    if case.impl == "jaxfm":
      from benchmarks import jaxfm_impl as impl  # pylint: disable=g-import-not-at-top
    else:
      from benchmarks import torch_impl as impl  # pylint: disable=g-import-not-at-top
    timer = functools.partial(common.time_steps, steps=case.steps, warmup=case.warmup)
    result = impl.measure(case, common.synthetic_batch(case), timer)
    # The steps may have reset the peak (`common.time_steps`); the whole child's is the larger.
    result["peak_rss_mib"] = max(result["peak_rss_setup_mib"], common.peak_rss_mib())
  print(json.dumps(result), flush=True)


def main(argv: Sequence[str]) -> None:
  del argv
  if _CHILD.value or _CEILING_CHILD.value:
    _child_main()
    return
  base = common.Case(impl="", model=_MODEL.value, task=_TASK.value, seq=_SEQ.value,
                     batch=_BATCH.value, arch=common.preset_arch(_MODEL.value, _LAYERS.value),
                     dtype=_DTYPE.value, steps=_STEPS.value,
                     warmup=_WARMUP.value, scan_layers=_SCAN.value, remat=_REMAT.value,
                     threads=_THREADS.value, compilation_cache=_CACHE.value)
  ceiling = _run_child(["--ceiling_child", f"--dtype={_DTYPE.value}",
                        f"--matmul_reps={_MATMUL_REPS.value}"], _jax_env(None))
  impls = [_IMPL.value] if _IMPL.value else list(IMPLS)
  records = []
  for round_index in range(_ROUNDS.value):
    for impl in impls:
      record = measure(dataclasses.replace(base, impl=impl), ceiling, round_index)
      records.append(record)
      if _JSON.value:
        print(json.dumps(record), flush=True)
  title = (f"{_MODEL.value} {_TASK.value} seq {_SEQ.value} batch {_BATCH.value} "
           f"({base.arch['num_layers']} layers, {_DTYPE.value})")
  print(f"{title}\n{_table(records, ceiling)}", file=sys.stderr if _JSON.value else sys.stdout)


if __name__ == "__main__":
  app.run(main)
