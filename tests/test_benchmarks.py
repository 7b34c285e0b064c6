"""`python -m benchmarks.step` runs and reports its documented fields (no timing assertions)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxfm.models import preset
from jaxfm.train.flops import mlm_flops_per_token

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_FIELDS = ("impl", "model", "task", "seq", "batch", "tokens_per_s", "step_s", "compile_s",
           "peak_rss_mib", "mfu", "first_step_s", "flops_per_token")


def _harness(*args: str) -> tuple[list[dict], str]:
  # One real CPU device, not the suite's 8 fake ones.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.step", "--json", "--steps=2", "--warmup=0",
       "--matmul_reps=1", *args], cwd=_ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def _check_sane(row: dict, impl: str, seq: int, batch: int) -> None:
  assert set(_FIELDS) <= set(row), sorted(set(_FIELDS) - set(row))
  assert (row["impl"], row["model"], row["task"], row["seq"], row["batch"]) == (
      impl, "tiny", "mlm", seq, batch)
  assert row["step_s"] > 0 and row["first_step_s"] > 0 and row["compile_s"] >= 0
  assert abs(row["tokens_per_s"] * row["step_s"] - seq * batch) < 1e-6 * seq * batch
  assert 0 < row["mfu"] < 2 and row["peak_rss_mib"] > 50


def test_jaxfm_tiny_mlm_reports_every_field():
  (row,), _ = _harness("--model=tiny", "--task=mlm", "--impl=jaxfm")
  _check_sane(row, "jaxfm", 128, 32)
  assert row["compile_s"] > 0
  assert row["flops_per_token"] == mlm_flops_per_token(preset("tiny"), 128, 20)


@pytest.mark.slow  # importing torch + transformers alone takes ~5 s here
def test_both_impls_interleave_and_report_the_pair_ratio():
  rows, table = _harness("--model=tiny", "--task=mlm", "--seq=16", "--batch=2")
  assert [r["impl"] for r in rows] == ["jaxfm", "torch"]
  for row in rows:
    _check_sane(row, row["impl"], 16, 2)
  # The HF head runs at every position, jaxfm's at the 3 masked ones only.
  assert rows[1]["flops_per_token"] == mlm_flops_per_token(preset("tiny"), 16, 16)
  assert rows[0]["flops_per_token"] == mlm_flops_per_token(preset("tiny"), 16, 3)
  assert "jaxfm/torch tokens/s per pair: median" in table


def test_profile_kinds_from_hlo():
  from benchmarks import xla_ops  # pylint: disable=import-outside-toplevel  # no flags
  hlo = """
  %ynn_fusion.3 = f32[4096,256]{1,0} fusion(%a, %b), kind=kCustom
  %dot.7 = f32[32,4,128,64]{3,2,1,0} dot(%c, %d), lhs_batch_dims={0,1}
  %broadcast_add_fusion.2 = (u32[32,4,128,128]{3,2,1,0}, u32[32,4,128,128]{3,2,1,0}) fusion(%e)
  ROOT %copy_bitcast_fusion.4 = f32[256,4096]{1,0} fusion(%f), kind=kLoop
  %select_add_fusion.1 = f32[30522,256]{1,0} fusion(%g, %h), kind=kLoop
  """
  assert xla_ops.op_kinds(hlo) == {
      "ynn_fusion.3": "GEMM, dense", "dot.7": "GEMM, batched (attention)",
      "broadcast_add_fusion.2": "random bits (dropout)",
      "copy_bitcast_fusion.4": "copy / transpose",
      "select_add_fusion.1": "other (elementwise, reductions)"}


def test_profile_runs_on_the_real_step():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--model=tiny", "--task=mlm",
                         "--batch=8", "--steps=1"], cwd=_ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shares = {line[:34].strip(): float(line.split()[-1].rstrip("%"))
            for line in proc.stdout.splitlines()[2:]}
  assert shares["GEMM, dense"] > 10 and shares["random bits (dropout)"] > 0, proc.stdout
  assert abs(sum(shares.values()) - 100) < 0.5, proc.stdout


def _ab(*flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "benchmarks.ab", "--model=tiny", "--task=mlm",
                         "--seq=16", "--batch=4", "--pairs=2", *flags], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_ab_alternates_two_model_configs_of_the_real_step():
  proc = _ab("--a=loss_vocab_chunk=0", "--b=loss_vocab_chunk=1000,hidden_dropout=0.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "tiny mlm seq 16 batch 4, 2 pairs", proc.stdout
  assert lines[1].startswith("  A {'loss_vocab_chunk': 0}: median ")
  assert lines[2].startswith("  B {'loss_vocab_chunk': 1000, 'hidden_dropout': 0.0}: median ")
  assert lines[3].startswith("  time A / time B per pair: median ")


def test_ab_rejects_an_unknown_or_mistyped_field():
  proc = _ab("--a=vocab_chunk=1")
  assert proc.returncode != 0 and "'vocab_chunk=1': expected NAME=VALUE" in proc.stderr
  proc = _ab("--b=num_layers=two")
  assert proc.returncode != 0 and "not a valid int for num_layers" in proc.stderr


def test_peak_rss_is_the_processs_own_and_resets_to_the_current_rss():
  # A parent 300 MiB larger than its child: ru_maxrss would hand the child the parent's peak.
  code = """
import json
from benchmarks import common
before = common.peak_rss_mib()
reset = common.reset_peak_rss()
after_reset = common.peak_rss_mib()
block = bytearray(200 * 2**20)
block[::4096] = b"x" * len(block[::4096])
print(json.dumps(dict(before=before, reset=reset, after_reset=after_reset,
                      after_alloc=common.peak_rss_mib())))
"""
  ballast = bytearray(300 * 2**20)
  ballast[::4096] = b"x" * len(ballast[::4096])
  proc = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True,
                        timeout=60, check=True)
  del ballast
  rss = json.loads(proc.stdout)
  assert rss["before"] < 200, rss  # a bare interpreter plus numpy, not the 300+ MiB parent
  if not rss["reset"]:
    pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
  assert rss["after_reset"] <= rss["before"] + 1
  assert 190 < rss["after_alloc"] - rss["after_reset"] < 230, rss


@pytest.mark.slow  # two prepare and two pretrain processes: minutes on 2 shared cores
def test_prepare_benchmark_reports_every_field(tmp_path):
  from tests.data_helpers import random_documents  # pylint: disable=import-outside-toplevel
  text = tmp_path / "text.txt"
  text.write_text("\n\n".join(random_documents(np.random.default_rng(0), 200)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.prepare", f"--text={text}", "--sizes_mb=0.1,0.2",
       f"--out={tmp_path / 'bench'}", "--num_shards=2", "--vocab_size=300", "--steps=1",
       "--loader_batches=3", "--loader_workers=1", "--max_seq_length=64"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  head, *rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert head["raw_encode_tokens_per_s_one_thread"] > 0
  assert [r["size_mb"] for r in rows] == [0.1, 0.2]
  for row in rows:
    assert abs(row["corpus_bytes"] - row["size_mb"] * 2**20) < 2
    assert row["tokens"] > 0 and row["prepare_tokens_per_s"] > 0
    assert row["pretrain_process_s"] > 0 and row["pretrain_peak_rss_mib"] > 50
    assert row["loader_examples_per_s_workers0"] > 0 and row["loader_examples_per_s_workers1"] > 0
  assert rows[1]["tokens"] > rows[0]["tokens"]
