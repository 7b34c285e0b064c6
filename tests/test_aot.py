"""The TPU "will it fit" check: on the 8 fake CPU devices always, on TPU topologies with libtpu."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import pytest

from jaxfm import aot
from jaxfm import config as config_lib
from jaxfm.data import length_groups
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.tasks import load_split
from tests import finetune_fixtures as ff
from tests.train_helpers import SEQ, VOCAB, tiny_config


def _libtpu_available() -> bool:
  try:
    aot.tpu_devices("v5e:2x2")
  except aot.AotError:
    return False
  return True


needs_libtpu = pytest.mark.skipif(not _libtpu_available(),
                                  reason="libtpu not installed (make aot-check installs it)")


def _tiny(**train):
  cfg = tiny_config(**train)
  cfg.data.vocab_size = VOCAB  # no tokenizer file: the check takes the vocab from here
  return cfg


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxfm.aot", *args], capture_output=True,
                        text=True, timeout=timeout, env=env, check=False)


@pytest.fixture(scope="module")
def cpu_report():
  [report] = aot.check(_tiny(), jax.devices(), hbm_bytes=16 * aot.GiB)
  return report


def test_check_on_cpu_devices_reports_memory_and_flops(cpu_report):
  r = cpu_report
  assert (r.devices, r.hosts, r.mesh) == (8, 1, {"data": 8, "fsdp": 1, "tensor": 1})
  for step in (r.train, r.eval):
    assert step.memory.arguments > 0 and step.memory.total > 0 and step.flops_per_device > 0
    assert step.compile_s > 0
  # The train step donates its state: outputs land in the arguments' buffers.
  assert r.train.memory.aliased > 0
  assert r.train.memory.total < r.train.memory.arguments + r.train.memory.outputs + \
      r.train.memory.temporaries + r.train.memory.generated_code
  # Gradients and the optimizer update make a train step dearer than an eval step.
  assert r.train.flops_per_device > r.eval.flops_per_device
  assert r.params > 0 and r.model_flops_per_step > 0
  assert r.step_s is None and r.tokens_per_s is None  # CPU: no peak FLOP/s known
  assert r.fits and "FITS" in aot.format_report(r, "tiny")


def test_train_step_memory_grows_with_the_batch(cpu_report):
  # 64 examples per device: activations outweigh the batch-independent optimizer temporaries.
  [bigger] = aot.check(_tiny(batch_size=512), jax.devices(), hbm_bytes=16 * aot.GiB)
  assert bigger.train.memory.temporaries > cpu_report.train.memory.temporaries
  assert bigger.model_flops_per_step == 64 * cpu_report.model_flops_per_step


def test_tiny_hbm_does_not_fit(cpu_report):
  r = dataclasses.replace(cpu_report, hbm_bytes=cpu_report.peak_bytes - 1)
  assert not r.fits
  assert "DOES NOT FIT" in aot.format_report(r, "tiny")
  assert dataclasses.replace(cpu_report, hbm_bytes=cpu_report.peak_bytes).fits


def test_peak_counts_the_optimizer_state_resident_during_eval(cpu_report):
  r = cpu_report
  big_eval = dataclasses.replace(
      r.eval, memory=dataclasses.replace(r.eval.memory, temporaries=10 * r.train.memory.total))
  r = dataclasses.replace(r, eval=big_eval)
  assert r.peak_bytes == (big_eval.memory.total + r.train.memory.arguments
                          - big_eval.memory.arguments)


def test_failed_compile_is_does_not_fit(cpu_report):
  oom = aot.CompiledStep(memory=None, flops_per_device=None, compile_s=1.0,
                         error="RESOURCE_EXHAUSTED: Ran out of memory")
  r = dataclasses.replace(cpu_report, train=oom)
  assert r.peak_bytes is None and not r.fits
  text = aot.format_report(r, "tiny")
  assert "OOM" in text and "RESOURCE_EXHAUSTED" in text and "DOES NOT FIT" in text
  json.dumps(r.to_json())


def test_step_time_at_half_mfu(cpu_report):
  r = dataclasses.replace(cpu_report, peak_flops=1e12)
  assert r.step_s == pytest.approx(r.model_flops_per_step / (0.5 * 1e12 * 8))
  assert r.tokens_per_s == pytest.approx(8 * SEQ / r.step_s)


def _tiny_finetune(task: str = "classification", buckets: str = "16,32"):
  cfg = config_lib.finetune_defaults()  # the tiny architecture
  cfg.task = task
  cfg.train.batch_size = 8
  cfg.data.max_seq_length, cfg.data.length_buckets = 64, buckets
  return cfg


def test_a_finetuning_config_compiles_one_shape_per_length_bucket():
  reports = aot.check(_tiny_finetune(), jax.devices(), hbm_bytes=16 * aot.GiB, num_labels=3)
  assert [r.seq_len for r in reports] == [16, 32, 64]
  assert all(r.fits and r.train.memory.total > 0 for r in reports)
  flops_per_step = [r.model_flops_per_step for r in reports]
  assert flops_per_step == sorted(flops_per_step) and flops_per_step[0] < flops_per_step[-1]
  temporaries = [r.train.memory.temporaries for r in reports]
  assert temporaries[0] < temporaries[-1]
  # Two more labels: two more columns of the classifier's [hidden, labels] kernel and bias.
  [five] = aot.check(_tiny_finetune(buckets=""), jax.devices(), 16 * aot.GiB, num_labels=5)
  assert five.params - reports[0].params == 2 * (128 + 1)


@pytest.mark.parametrize("task", ["ner", "qa", "regression"])
def test_every_finetuning_kind_compiles(task):
  [report] = aot.check(_tiny_finetune(task, buckets=""), jax.devices(), 16 * aot.GiB)
  assert report.fits and report.seq_len == 64 and report.eval.memory.total > 0


def test_auto_buckets_compile_the_longest_length_only():
  assert aot.compiled_lengths(_tiny_finetune(buckets="auto")) == (64,)
  assert aot.compiled_lengths(_tiny_finetune(buckets="16,32,64,99")) == (16, 32, 64)


def test_buckets_not_planned_from_data_report_no_padding_share():
  reports = aot.check(_tiny_finetune(buckets="32"), jax.devices(), 16 * aot.GiB)
  assert [(r.length_buckets, r.padding_share) for r in reports] == [((32, 64), None)] * 2
  assert "tokens computed per real token" not in aot.format_report(reports[0], "t")


def test_auto_buckets_are_planned_from_the_training_file_as_the_run_chooses_them(tmp_path):
  train, _ = ff.write_sentiment(tmp_path, n_train=400)
  ff.write_model_dir(tmp_path)
  cfg = _tiny_finetune(buckets="auto")
  cfg.data.train_file, cfg.data.max_buckets, cfg.data.bucket_multiple = train, 3, 4
  with pytest.raises(aot.AotError, match="data.tokenizer"):
    aot.plan_length_buckets(cfg, "tpu")
  cfg.data.tokenizer = str(tmp_path / "vocab.txt")
  # A 3-epoch run of 150 steps on a TPU: no length saves what its compile costs there.
  assert aot.plan_length_buckets(cfg, "tpu").data.length_buckets == "64"
  cfg.data.compile_cost_tokens = "0"  # compiles counted free: the fewest tokens
  planned = aot.plan_length_buckets(cfg, "tpu")
  tokenizer = load_tokenizer(cfg.data.tokenizer, lowercase=True)
  split, _ = load_split("classification", cfg.data, train, tokenizer.backend, None, 0)
  lengths = split.row_lengths()  # [rows]
  expected = length_groups.auto_buckets(lengths, 8, cfg.data.seed, False, 64, 3, 4)
  assert len(expected) > 1 and config_lib.length_buckets(planned.data) == expected
  assert planned.data.padding_share == pytest.approx(
      length_groups.padding_share(lengths, 8, cfg.data.seed, expected, False), abs=1e-4)
  assert cfg.data.length_buckets == "auto"  # planned on a copy
  reports = aot.check(cfg, jax.devices(), hbm_bytes=16 * aot.GiB)
  assert [r.seq_len for r in reports] == list(expected)
  assert all(r.length_buckets == expected for r in reports)
  assert "tokens computed per real token" in aot.format_report(reports[0], "t")


def test_architecture_preset_replaces_the_architecture_only():
  cfg = _tiny_finetune()
  cfg.model.hidden_dropout = 0.3
  base = aot.with_architecture(cfg, "base")
  assert (base.model.hidden_size, base.model.num_layers, base.model.vocab_size) == (768, 12, 30522)
  assert base.model.hidden_dropout == 0.3 and cfg.model.hidden_size != 768
  with pytest.raises(aot.AotError, match="--architecture='huge'"):
    aot.with_architecture(cfg, "huge")


def test_vocab_comes_from_data_when_the_tokenizer_is_trained():
  cfg = _tiny()
  cfg.data.vocab_size = 200
  assert aot.resolve_vocab(cfg).model.vocab_size == 200
  cfg.data.tokenizer = "vocab.txt"
  assert aot.resolve_vocab(cfg).model.vocab_size == VOCAB
  assert cfg.model.vocab_size == VOCAB  # the caller's config is untouched


def test_mesh_that_does_not_match_the_devices_names_the_mesh():
  cfg = _tiny()
  cfg.mesh.data, cfg.mesh.fsdp = 3, 1
  with pytest.raises(aot.AotError, match=r"mesh.data/fsdp/tensor=\(3, 1, 1\).*8 devices"):
    aot.check(cfg, jax.devices(), hbm_bytes=aot.GiB)


def test_batch_not_divisible_by_the_mesh_names_the_batch():
  with pytest.raises(aot.AotError, match="train.batch_size=12"):
    aot.check(_tiny(batch_size=12), jax.devices(), hbm_bytes=aot.GiB)


@pytest.mark.parametrize("name, message", [
    ("v9x:2x2", "unknown TPU generation 'v9x'; choose one of v4, v5e, v5p, v6e"),
    ("v5litepod-8", "expected GENERATION:AxB"),
    ("v5e:0x4", "every dimension must be >= 1"),
])
def test_bad_topology_names_the_flag(name, message):
  with pytest.raises(aot.AotError, match=f"--topology='{name}'"):
    aot.parse_topology(name)
  with pytest.raises(aot.AotError, match=message):
    aot.parse_topology(name)


def test_topology_parsing():
  chip, dims = aot.parse_topology("v4:2x2x2")
  assert (chip, dims) == (aot.CHIPS["v4"], (2, 2, 2))
  assert aot.parse_topology("v5e:2x4") == (aot.CHIPS["v5e"], (2, 4, 1))


def test_cli_unknown_topology_is_a_clear_error():
  result = _cli("--config=configs/pretrain/bert_tiny_cpu.py", "--topology=v9x:2x2")
  assert result.returncode == 2, result.stderr
  assert "error: --topology='v9x:2x2': unknown TPU generation" in result.stderr
  assert "Traceback" not in result.stderr


@pytest.mark.skipif(_libtpu_available(), reason="libtpu is installed")
def test_cli_without_libtpu_says_how_to_install_it():
  result = _cli("--config=configs/pretrain/bert_tiny_cpu.py", "--topology=v5e:2x4")
  assert result.returncode == 2, result.stderr
  assert "needs libtpu" in result.stderr and "Traceback" not in result.stderr


@needs_libtpu
def test_topologies_have_one_device_per_chip_and_their_hosts():
  for name, chips, hosts in [("v5e:2x4", 8, 1), ("v5e:4x4", 16, 4), ("v4:2x2x2", 8, 2),
                             ("v4:2x2x4", 16, 4), ("v5e:2x2", 4, 1)]:
    devices, chip = aot.tpu_devices(name)
    assert len(devices) == chips and len({d.process_index for d in devices}) == hosts
    assert chip is aot.CHIPS[name.split(":")[0]]


@needs_libtpu
def test_tpu_check_of_the_tiny_config_fits_and_has_a_step_time():
  devices, chip = aot.tpu_devices("v5e:2x2")
  [r] = aot.check(_tiny(), devices, chip.hbm_bytes)
  assert r.fits and r.device_kind == "TPU v5 lite" and r.devices == 4
  assert r.train.memory.total > 0 and r.train.flops_per_device > 0
  assert r.step_s == pytest.approx(r.model_flops_per_step / (0.5 * 197e12 * 4))


@needs_libtpu
def test_cli_mesh_mismatch_names_the_mesh():
  result = _cli("--config=configs/pretrain/bert_tiny_cpu.py", "--topology=v5e:2x4",
                "--config.mesh.data=3")
  assert result.returncode == 2, result.stderr
  assert "mesh.data/fsdp/tensor=(3, 1, 1) does not match the 8 devices" in result.stderr


@needs_libtpu
def test_cli_libtpu_rejects_a_layout():
  result = _cli("--config=configs/pretrain/bert_tiny_cpu.py", "--topology=v5e:3x3")
  assert result.returncode == 2 and "--topology='v5e:3x3': libtpu rejects it" in result.stderr


@needs_libtpu
def test_cli_oversized_batch_does_not_fit_and_exits_1():
  result = _cli("--config=configs/pretrain/bert_tiny_cpu.py", "--topology=v5e:2x2",
                "--config.train.batch_size=65536", "--json")
  assert result.returncode == 1, result.stderr[-2000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report["fits"] is False and report["topology"] == "v5e:2x2"
  assert report["train"]["memory"] is None or report["peak_bytes"] > report["hbm_bytes"]


@needs_libtpu
def test_cli_finetuning_config_on_a_multi_host_slice_reports_each_length():
  result = _cli("--config=configs/finetune/conll2003.py", "--topology=v4:2x2x4",
                "--architecture=base", "--num_labels=9", "--config.data.length_buckets=64",
                "--json", timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  reports = [json.loads(line) for line in result.stdout.strip().splitlines()]
  assert [r["seq_len"] for r in reports] == [64, 128]
  assert all(r["fits"] and r["hosts"] == 4 and r["devices"] == 16 for r in reports)
  # Twice the tokens, about twice the work; memory is the params' and the optimizer's at both.
  assert reports[1]["model_flops_per_step"] > 1.9 * reports[0]["model_flops_per_step"]
