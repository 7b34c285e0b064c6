"""`python -m jaxfm.pretrain` end to end: run, resume, config guards, export of the workdir to HF."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config=configs/pretrain/bert_tiny_cpu.py", "--config.train.steps=6",
         "--config.train.eval_every=6", "--config.train.eval_batches=2",
         "--config.train.checkpoint_every=3", "--config.train.batch_size=8",
         "--config.train.progress_bar=false", "--config.data.vocab_size=512",
         "--config.data.max_seq_length=64", "--config.model.num_layers=1",
         "--config.optim.warmup_steps=1"]


ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _run(*args, check=True):
  proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=ENV, capture_output=True,
                        text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("pretrain")
  proc = _run("jaxfm.pretrain", *SMALL, "--config.runtime.platform=cpu", f"--workdir={path}")
  assert "held-out MLM: step 0:" in proc.stdout and "step 6:" in proc.stdout
  return path


def test_run_writes_checkpoints_metrics_config(workdir):
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["config"]["model"]["vocab_size"] <= 512 and "jax" in saved["versions"]
  steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert 6 in steps and list((workdir / "tensorboard").iterdir())
  assert (workdir / "DONE").read_text() == "step 6\n"  # finished: the babysitter stops


@pytest.mark.slow  # two launches of the CLI; tests/multihost covers the exit status in the fast set
def test_sigterm_saves_and_exits_143_then_a_relaunch_finishes(tmp_path):
  run = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "jaxfm.pretrain", *SMALL,
                           "--config.train.steps=100000", f"--workdir={run}"], cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics, deadline = run / "metrics.jsonl", time.monotonic() + 240
  try:
    while not metrics.exists() or '"eval"' not in metrics.read_text():  # the step-0 evaluation
      assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
  finally:
    proc.kill()
  assert proc.returncode == 143, out[-3000:]  # saved, not finished: relaunch to resume
  assert "(preempted; rerun to resume)" in out and not (run / "DONE").exists()
  saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
  _run("jaxfm.pretrain", *SMALL, f"--config.train.steps={saved + 1}", f"--workdir={run}")
  assert (run / "DONE").read_text() == f"step {saved + 1}\n"


def test_sigterm_before_training_starts_exits_143_without_a_traceback(tmp_path):
  log = tmp_path / "log"
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", "jaxfm.pretrain", *SMALL,
                             f"--workdir={tmp_path / 'run'}"], cwd=ROOT, env=ENV, stdout=out,
                            stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 120
  try:
    while "process(es)" not in log.read_text():  # the runtime is up; data and compile follow
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
  finally:
    proc.kill()
  text = log.read_text()
  assert proc.returncode == 143, text[-3000:]  # preempted, not failed: a supervisor relaunches
  assert "SIGTERM before training started" in text and "Traceback" not in text


def test_rerun_resumes_and_more_steps_continue(workdir):
  proc = _run("jaxfm.pretrain", *SMALL, "--config.train.steps=8", f"--workdir={workdir}")
  assert "resumed from step 6" in proc.stderr
  assert "step 8:" in proc.stdout
  assert any((workdir / "compile_cache").iterdir())  # the restart could load executables


def test_changed_config_is_refused_with_a_diff(workdir):
  proc = _run("jaxfm.pretrain", *SMALL, "--config.optim.peak_learning_rate=0.5",
              f"--workdir={workdir}", check=False)
  assert proc.returncode == 1
  assert "optim.peak_learning_rate: 0.002 -> 0.5" in proc.stderr


def test_a_run_on_another_platform_than_asked_fails_at_once(tmp_path):
  proc = _run("jaxfm.pretrain", *SMALL, "--config.runtime.platform=tpu",
              f"--workdir={tmp_path / 'run'}", check=False)
  assert proc.returncode == 1
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(
      "error: runtime.platform='tpu' but this run came up on cpu: "), proc.stderr[-3000:]
  assert "backend" in errors[0].lower() and not (tmp_path / "run").exists()


def test_override_typo_and_bad_value_fail_before_device_work(tmp_path):
  proc = _run("jaxfm.pretrain", *SMALL, "--config.train.stepz=3", f"--workdir={tmp_path}",
              check=False)
  assert proc.returncode != 0 and "steps" in proc.stderr and "stepz" in proc.stderr
  proc = _run("jaxfm.pretrain", *SMALL, "--config.model.num_heads=5", f"--workdir={tmp_path}",
              check=False)
  assert proc.returncode == 1
  assert "model.num_heads=5 does not divide model.hidden_size=128" in proc.stderr


def test_workdir_exports_to_hugging_face(workdir, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = tmp_path / "hf"
  _run("jaxfm.convert", "--to_hf", f"--from={workdir}", f"--out={out}")
  model, info = transformers.BertForMaskedLM.from_pretrained(str(out), output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"]
  ids = torch.tensor([[2, 10, 11, 12, 3]])
  logits = model(input_ids=ids).logits.detach().numpy()
  assert logits.shape[-1] == json.loads((workdir / "config.json").read_text())[
      "config"]["model"]["vocab_size"] and np.isfinite(logits).all()
