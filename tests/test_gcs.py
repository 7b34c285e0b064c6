"""gs:// end to end against a GCS API server on loopback (tests/gcs_emulator.py): gcsfs, etils
epath and Orbax's tensorstore writes all go to the emulator, in this process and in trainers.

What stays unverified here: Google's authentication (the emulator takes a fixed test token) and
the real service's consistency and retry behaviour under load (one emulator serves one request
at a time); gRPC and hierarchical-namespace buckets (gcsfs's experimental client is off).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from jaxfm import workdir as workdir_lib
from jaxfm.train import checkpoint
from tests import finetune_fixtures as ff
from tests.multihost import harness
from tests.reliability.conftest import (BASE, EVERY, LAUNCH_TIMEOUT_S, ROOT, Launch,
                                        assert_trees_equal, saved_state, trainer)  # noqa: F401
from tests.test_pretrain_cli import SMALL


def test_every_layer_reaches_the_emulator(gcs_bucket):
  text = epath.Path(gcs_bucket) / "notes" / "a.txt"
  text.parent.mkdir(parents=True, exist_ok=True)
  text.write_text("through etils epath")
  state = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((5,), jnp.int32)}
  with ocp.CheckpointManager(f"{gcs_bucket}/ckpt", item_names=("state",)) as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
  jax.tree.map(np.testing.assert_array_equal, restored["state"], state)
  files = gcs_bucket.files()
  assert gcs_bucket.fs().cat(f"{gcs_bucket}/notes/a.txt") == b"through etils epath"
  # tensorstore's own writes: the OCDBT array data and manifest, on the emulator
  assert any(f.startswith("ckpt/1/state/ocdbt.process_0/d/") for f in files), files
  assert "ckpt/1/state/manifest.ocdbt" in files and "ckpt/1/commit_success.txt" in files


def test_task_files_read_from_gcs_as_locally(gcs_bucket, tmp_path):
  from jaxfm import config as config_lib, tasks  # pylint: disable=import-outside-toplevel
  from jaxfm.data.tokenizer import train_tokenizer  # pylint: disable=import-outside-toplevel
  train, _ = ff.write_sentiment(tmp_path)
  conll, _ = ff.write_conll(tmp_path)
  tokenizer = train_tokenizer([Path(train).read_text()], vocab_size=200)
  for kind, local in (("classification", train), ("ner", conll)):
    remote = epath.Path(gcs_bucket) / Path(local).name
    remote.write_bytes(b"\xef\xbb\xbf" + Path(local).read_bytes())  # with a byte-order mark
    data = config_lib.finetune_defaults().data
    ours = tasks.load_split(kind, data, str(remote), tokenizer.backend, None)
    theirs = tasks.load_split(kind, data, local, tokenizer.backend, None)
    assert ours[1] == theirs[1] and len(ours[0].examples) == len(theirs[0].examples) > 0
    np.testing.assert_array_equal(ours[0].features["input_ids"],
                                  theirs[0].features["input_ids"])


def _status(request: urllib.request.Request) -> int:
  try:
    with urllib.request.urlopen(request, timeout=10) as response:
      return response.status
  except urllib.error.HTTPError as e:
    return e.code


def test_the_emulator_keeps_the_generation_rules_tensorstore_relies_on(gcs_bucket):
  server = gcs_bucket.server
  name = gcs_bucket.removeprefix(f"gs://{server.bucket}/")

  def upload(condition: str) -> int:
    return _status(urllib.request.Request(
        f"{server.url}/upload/storage/v1/b/{server.bucket}/o?uploadType=media&name={name}/k"
        f"{condition}", data=b"x", method="POST"))

  assert upload("&ifGenerationMatch=0") == 200  # absent: created
  assert upload("&ifGenerationMatch=0") == 412  # present now
  with urllib.request.urlopen(f"{server.url}/download/storage/v1/b/{server.bucket}/o/"
                              f"{urllib.request.quote(name + '/k', safe='')}?alt=media") as r:
    generation = r.headers["x-goog-generation"]
  assert upload(f"&ifGenerationMatch={generation}") == 200
  assert upload(f"&ifGenerationMatch={generation}") == 412  # replaced meanwhile


# ---------------------------------------------------------------- trainers on gs://


def _start(trainer, gcs_bucket, log, overrides: dict[str, Any],
           killed_in_save: int | None = None) -> Launch:
  """A worker training `gcs_bucket`/run (with the reliability suite's environment and
  compilation cache), logging to the local file `log`."""
  argv = [sys.executable, "-m", "tests.reliability.worker", f"{gcs_bucket}/run",
          json.dumps(overrides), *([f"kill_in_save:{killed_in_save}"] if killed_in_save else [])]
  with open(log, "w") as out:
    proc = subprocess.Popen(argv, cwd=ROOT, env={**trainer.env, **gcs_bucket.server.env},
                            stdout=out, stderr=subprocess.STDOUT)
  return Launch(proc, log)


def _losses(workdir: str) -> dict[int, float]:
  """Per-step training loss of every segment of a run; a resumed segment's rewrite wins."""
  return {r["step"]: r["loss"] for r in workdir_lib.read_metrics(workdir) if r["split"] == "train"}


def _assert_same_run(workdir: str, reference_dir) -> None:
  assert _losses(workdir) == _losses(str(reference_dir))
  assert_trees_equal(saved_state(epath.Path(workdir)), saved_state(reference_dir))


@pytest.fixture(scope="module")
def reference(trainer, tmp_path_factory):
  """An uninterrupted run of the base config on a local disk."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = trainer.run(workdir, BASE)
  assert result.returncode == 0, result.output[-3000:]
  return workdir


def test_sigterm_then_resume_on_gcs_is_the_uninterrupted_local_run(trainer, reference,
                                                                   gcs_bucket, tmp_path):
  launch = _start(trainer, gcs_bucket, tmp_path / "first.log", {**BASE, "pace": 0.3})
  marker = f"run/checkpoints/{EVERY}/commit_success.txt"
  deadline = time.monotonic() + LAUNCH_TIMEOUT_S
  while marker not in gcs_bucket.files("run/checkpoints"):
    assert launch.proc.poll() is None and time.monotonic() < deadline, launch.finish().output
    time.sleep(0.2)
  launch.proc.send_signal(signal.SIGTERM)
  first = launch.finish()
  assert first.returncode == 0 and "DONE step=" in first.output, first.output[-3000:]
  stopped = int(first.output.split("DONE step=")[1].split()[0])
  assert EVERY <= stopped < BASE["train.steps"], first.output[-3000:]
  second = _start(trainer, gcs_bucket, tmp_path / "second.log", BASE).finish()
  assert second.returncode == 0 and "DONE step=12" in second.output, second.output[-3000:]
  assert not second.error_lines(), second.output[-3000:]
  segments = [f for f in gcs_bucket.files("run") if "/metrics-" in f]
  assert segments == ["run/metrics-000000000.jsonl", f"run/metrics-{stopped:09d}.jsonl"]
  assert len([f for f in gcs_bucket.files("run/tensorboard") if ".tfevents." in f]) == 2
  _assert_same_run(f"{gcs_bucket}/run", reference)


@pytest.mark.parametrize("step", [
    EVERY,  # the only checkpoint: the relaunch starts afresh
    pytest.param(2 * EVERY, marks=pytest.mark.slow),  # falls back to the step before
])
def test_a_save_killed_mid_write_is_incomplete_not_corrupt(trainer, reference, gcs_bucket,
                                                           tmp_path, step):
  killed = _start(trainer, gcs_bucket, tmp_path / "killed.log", BASE, killed_in_save=step).finish()
  assert killed.returncode == -signal.SIGKILL, killed.output[-3000:]
  left = gcs_bucket.files(f"run/checkpoints/{step}")
  assert left and f"run/checkpoints/{step}/commit_success.txt" not in left  # written in part
  relaunch = _start(trainer, gcs_bucket, tmp_path / "relaunch.log", BASE).finish()
  assert relaunch.returncode == 0, relaunch.output[-3000:]
  warnings = [line for line in relaunch.output.splitlines() if "save did not finish" in line]
  assert len(warnings) == 1 and f"checkpoint step {step} has no commit_success.txt" in (
      warnings[0]), relaunch.output[-3000:]
  assert not relaunch.error_lines(), relaunch.output[-3000:]
  assert not [f for f in gcs_bucket.files("run/checkpoints") if checkpoint.QUARANTINE in f]
  # the relaunch's metrics segment is named by the step it started from
  assert [f for f in gcs_bucket.files("run") if "/metrics-" in f] == sorted(
      {"run/metrics-000000000.jsonl", f"run/metrics-{step - EVERY:09d}.jsonl"})
  # A SIGKILL loses the killed segment's records since its last rewrite; every step the
  # relaunch trained is there, and every loss logged equals the uninterrupted run's.
  losses, expected = _losses(f"{gcs_bucket}/run"), _losses(str(reference))
  assert set(range(step - EVERY + 1, BASE["train.steps"] + 1)) <= losses.keys()
  assert losses.items() <= expected.items()
  assert_trees_equal(saved_state(epath.Path(f"{gcs_bucket}/run")), saved_state(reference))


# ---------------------------------------------------------------- two hosts, one failing read


@flax.struct.dataclass
class _State:
  params: Any


def restore_on_two_hosts(workdir: str) -> None:
  """One of two processes (`harness.launched`): saves steps 1 and 2 of a state sharded over
  both, then restores it while process 1 alone cannot read step 2; prints the step restored."""
  from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  from jaxfm import runtime  # pylint: disable=g-import-not-at-top
  runtime.initialize_runtime()
  sharding = NamedSharding(jax.make_mesh((jax.device_count(),), ("data",)), PartitionSpec("data"))
  values = np.arange(8 * jax.device_count(), dtype=np.float32)
  state = _State({"w": jax.make_array_from_callback(values.shape, sharding, lambda i: values[i])})
  manager = checkpoint.make_manager(workdir, keep=3)
  for step in (1, 2):
    checkpoint.save(manager, step, state, {"batches": step}, {})
  manager.wait_until_finished()
  original = ocp.StandardCheckpointHandler.restore

  def restore(self, directory, *args, **kwargs):
    if jax.process_index() == 1 and epath.Path(directory).parent.name == "2":
      raise OSError(f"injected read failure of {directory} on process 1")
    return original(self, directory, *args, **kwargs)

  ocp.StandardCheckpointHandler.restore = restore
  abstract = checkpoint.abstract_like(state, jax.tree.map(lambda _: sharding, state))
  restored = checkpoint.restore_latest(checkpoint.make_manager(workdir, keep=3), abstract)
  np.testing.assert_array_equal(jax.experimental.multihost_utils.process_allgather(
      restored.state.params["w"], tiled=True), values)
  print(f"restored step {restored.step}", flush=True)


def test_a_read_failing_on_one_host_only_falls_back_on_both(gcs_bucket, tmp_path):
  argv = [sys.executable, "-c", "import sys; from tests import test_gcs; "
          "test_gcs.restore_on_two_hosts(sys.argv[1])", f"{gcs_bucket}/run"]
  with harness.launched(argv, 2, 2, tmp_path, "restore") as group:
    group.wait(timeout_s=120)
    logs = [log.read_text() for log in group.logs]
  assert all("restored step 1" in log for log in logs), group.tails()
  assert "restore failed on process(es) 1" in logs[0], logs[0][-3000:]
  assert "injected read failure" in logs[1], logs[1][-3000:]
  assert [f for f in gcs_bucket.files("run/checkpoints") if f.endswith("commit_success.txt")
          and "/" not in f.removeprefix("run/checkpoints/").removesuffix("/commit_success.txt")
          ] == ["run/checkpoints/1/commit_success.txt", "run/checkpoints/2.corrupt/commit_success.txt"]


# ---------------------------------------------------------------- the command-line tools on gs://


def _cli(env: dict[str, str], *argv: str, code: int = 0) -> str:
  proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=LAUNCH_TIMEOUT_S)
  assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
  return proc.stdout + proc.stderr


def _preempted(env: dict[str, str], log, *argv: str, when: str) -> str:
  """Runs a training CLI until `when` is in its output, then SIGTERMs it; its output."""
  with open(log, "w") as out:
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
  deadline = time.monotonic() + LAUNCH_TIMEOUT_S
  try:
    while when not in log.read_text(errors="replace"):
      assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(LAUNCH_TIMEOUT_S)
  finally:
    proc.kill()
  assert proc.returncode == 143, log.read_text()[-3000:]  # saved, not finished
  return log.read_text(errors="replace")


def _newest_committed(gcs_bucket, under: str) -> int:
  return max(int(f.split("/")[-2]) for f in gcs_bucket.files(under)
             if f.endswith("/commit_success.txt") and f.count("/") == under.count("/") + 2)


@pytest.mark.slow  # seven launches of the command-line tools, 3-5 minutes on 2 busy cores
def test_pretrain_preempt_resume_then_finetune_evaluate_predict_convert_on_gcs(gcs_bucket,
                                                                               tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_LOG_COMPILES="1")
  pre = f"{gcs_bucket}/pretrain"
  argv = ["jaxfm.pretrain", *SMALL, "--config.train.steps=100000", f"--workdir={pre}"]
  _preempted(env, tmp_path / "first.log", *argv, when="[eval] step 0:")
  first_stop = _newest_committed(gcs_bucket, "pretrain/checkpoints")
  # The same command again loads the executables the first launch stored in WORKDIR/compile_cache
  # on gs:// (a changed train.steps changes the compiled schedule, and so compiles anew).
  next_eval = (first_stop // 6 + 1) * 6  # SMALL evaluates every 6 steps
  out = _preempted(env, tmp_path / "second.log", *argv, when=f"[eval] step {next_eval}:")
  assert "Persistent compilation cache hit for 'jit_train_step'" in out, out[-3000:]
  assert f"resumed from step {first_stop}" in out, out[-3000:]
  stop = _newest_committed(gcs_bucket, "pretrain/checkpoints")
  out = _cli(env, "jaxfm.pretrain", *SMALL, f"--config.train.steps={stop + 2}", f"--workdir={pre}")
  assert f"resumed from step {stop}" in out
  files = gcs_bucket.files("pretrain")
  assert epath.Path(f"{pre}/DONE").read_text() == f"step {stop + 2}\n"
  assert [f for f in files if "/metrics-" in f] == [
      "pretrain/metrics-000000000.jsonl", f"pretrain/metrics-{first_stop:09d}.jsonl",
      f"pretrain/metrics-{stop:09d}.jsonl"]
  assert [r["step"] for r in workdir_lib.read_metrics(pre) if r["split"] == "eval"][0] == 0
  assert len([f for f in files if ".tfevents." in f]) == 3
  assert {"pretrain/config.json", "pretrain/tokenizer/vocab.txt"} <= set(files)

  train, dev = (f"{gcs_bucket}/data/{Path(f).name}" for f in ff.write_sentiment(tmp_path))
  for remote in (train, dev):
    epath.Path(remote).write_bytes((tmp_path / Path(remote).name).read_bytes())
  ft = f"{gcs_bucket}/sst2"
  out = _cli(env, "jaxfm.finetune", "--config=configs/finetune/sst2.py", f"--workdir={ft}",
             f"--config.init_from={pre}", f"--config.data.train_file={train}",
             f"--config.data.dev_file={dev}", "--config.train.epochs=2",
             "--config.train.batch_size=16", "--config.data.max_seq_length=32",
             "--config.train.progress_bar=false", "--config.optim.peak_learning_rate=1e-3")
  final = json.loads(out.strip().splitlines()[-1] if out.strip().startswith("{") else
                     [l for l in out.splitlines() if l.startswith("{")][-1])
  scores = json.loads([l for l in _cli(env, "jaxfm.evaluate", f"--workdir={ft}", "--split=dev")
                       .splitlines() if l.startswith("{")][-1])
  assert scores["accuracy"] == pytest.approx(final["dev"]["accuracy"]), (scores, final)
  epath.Path(f"{gcs_bucket}/data/in.jsonl").write_text(
      '{"sentence": "the film was great"}\n{"sentence": "a very awful plot"}\n')
  _cli(env, "jaxfm.predict", f"--workdir={ft}", f"--input={gcs_bucket}/data/in.jsonl",
       f"--output={gcs_bucket}/preds.jsonl")
  rows = [json.loads(l) for l in epath.Path(f"{gcs_bucket}/preds.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and all(set(r["probabilities"]) == {"0", "1"} for r in rows)
  out = _cli(env, "jaxfm.convert", "--to_hf", f"--from={ft}", f"--out={tmp_path / 'hf'}")
  assert "exported BertForSequenceClassification" in out
  assert (tmp_path / "hf" / "config.json").exists()
