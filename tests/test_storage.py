"""Object-store workdirs without a network: a gs:// path without gcsfs is one `error:` line at
start-up, metrics never rely on append, and the end of a training run (exit status, DONE)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib

import ml_collections
import pytest
from etils import epath

from jaxfm import config as config_lib
from jaxfm import runtime
from jaxfm import workdir as workdir_lib
from jaxfm.pretraining import run as pretraining_run
from jaxfm.train import loop, writer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = "pip install 'jaxfm[gcs]'"
# Runs an entry point in a process where neither gcsfs nor TensorFlow can be imported.
_WITHOUT_GCSFS = ("import sys; sys.modules['gcsfs'] = sys.modules['tensorflow'] = None; "
                  "import runpy; sys.argv[0] = sys.argv[1]; del sys.argv[1]; "
                  "runpy.run_module(sys.argv[0], run_name='__main__')")


def test_tpu_extra_brings_gcsfs_and_the_base_install_does_not():
  with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  extras = project["optional-dependencies"]
  assert "jaxfm[gcs]" in extras["tpu"] and any(d.startswith("gcsfs") for d in extras["gcs"])
  assert not any(d.startswith("gcsfs") for d in project["dependencies"])


@pytest.fixture
def no_gcsfs(monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)
  monkeypatch.setitem(sys.modules, "tensorflow", None)


def test_gs_path_without_gcsfs_names_the_fix(no_gcsfs):
  with pytest.raises(workdir_lib.WorkdirError) as e:
    workdir_lib.require_gcs_support({"--workdir": "gs://bucket/run", "--input": "local.jsonl"})
  assert str(e.value) == ("--workdir=gs://bucket/run: gs:// paths need gcsfs, which is not "
                          f"installed: {FIX}")


def test_local_paths_or_gcsfs_installed_pass(no_gcsfs, monkeypatch):
  workdir_lib.require_gcs_support({"--workdir": "runs/x", "data.tokenizer": "/abs/vocab.txt"})
  present = lambda name, *a: object() if name == "gcsfs" else None
  monkeypatch.setattr(importlib.util, "find_spec", present)
  workdir_lib.require_gcs_support({"--workdir": "gs://bucket/run"})


def test_every_gs_field_of_the_config_is_named(no_gcsfs):
  cfg = config_lib.pretrain_defaults()
  cfg.init_from = "hf:gs://bucket/bert"
  cfg.data.train_files = "gs://bucket/corpus/*.txt.gz"
  with pytest.raises(workdir_lib.WorkdirError) as e:
    runtime.check_paths(cfg, workdir="runs/local")
  named = str(e.value).split(": gs://")[0].split(", ")
  assert sorted(named) == ["data.train_files=gs://bucket/corpus/*.txt.gz",
                           "init_from=hf:gs://bucket/bert"]
  runtime.check_paths(ml_collections.ConfigDict({"a": ["x", {"b": "y"}]}), workdir="runs/local")


@pytest.mark.parametrize("argv", [
    ["jaxfm.pretrain", "--config=configs/pretrain/bert_tiny_cpu.py", "--workdir=gs://b/run"],
    ["jaxfm.evaluate", "--workdir=gs://b/sst2"],
    ["jaxfm.convert", "--to_hf", "--out=hf-out", "--from=gs://b/run"],
], ids=["pretrain", "evaluate", "convert"])
def test_cli_without_gcsfs_is_one_error_line(argv):
  env = {**os.environ, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", _WITHOUT_GCSFS, *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  want = f"error: {argv[-1]}: gs:// paths need gcsfs, which is not installed: {FIX}"
  assert errors == [want], proc.stderr[-3000:]


def test_finish_training_exits_143_after_a_preemption_else_marks_done(tmp_path):
  with pytest.raises(SystemExit) as e:
    runtime.finish_training(str(tmp_path), 5, preempted=True)
  assert e.value.code == runtime.PREEMPTED_EXIT == 143 and not (tmp_path / "DONE").exists()
  runtime.finish_training(str(tmp_path), 9, preempted=False)
  assert (tmp_path / "DONE").read_text() == "step 9\n"
  workdir_lib.prepare_workdir(str(tmp_path), config_lib.pretrain_defaults(), False)
  assert not (tmp_path / "DONE").exists()  # a launch that trains again writes it anew


@pytest.fixture
def object_store(monkeypatch):
  """Local folders acting as an object store: opening a file for append fails (gcsfs would
  silently overwrite it instead)."""
  original = epath.Path.open

  def no_append(self, mode="r", *args, **kwargs):
    assert "a" not in mode, f"append to {self} on an object store"
    return original(self, mode, *args, **kwargs)

  monkeypatch.setattr(workdir_lib, "on_object_store", lambda workdir: True)
  monkeypatch.setattr(epath.Path, "open", no_append)


def _segment(workdir, start: int, stop: int) -> None:
  """One launch's metrics: the step-`start` evaluation and train steps up to `stop`."""
  metric_writer = writer.MetricWriter(str(workdir), start_step=start)
  metric_writer.write(start, {"loss": 9.0 - start, "accuracy": 0.1}, "eval")
  for step in range(start + 1, stop + 1):
    metric_writer.write(step, {"loss": 10.0 - step})
  metric_writer.close()


def _steps(workdir) -> list[tuple[str, int]]:
  return [(r["split"], r["step"]) for r in workdir_lib.read_metrics(str(workdir))]


def test_object_store_metrics_one_file_per_segment_read_in_order(object_store, tmp_path, capsys):
  _segment(tmp_path, 0, 3)
  _segment(tmp_path, 2, 4)  # resumed from step 2: its steps 3.. replace the first segment's
  assert sorted(p.name for p in tmp_path.glob("metrics*")) == [
      "metrics-000000000.jsonl", "metrics-000000002.jsonl"]
  assert _steps(tmp_path) == [("eval", 0), ("train", 1), ("train", 2), ("train", 3),
                              ("eval", 2), ("train", 3), ("train", 4)]
  pretraining_run.report(str(tmp_path), loop.TrainResult(4, {}, {}, preempted=False))
  assert "held-out MLM: step 0: loss 9.000 accuracy 0.100  ->  step 2: loss 7.000" in (
      capsys.readouterr().out)


def test_object_store_segment_is_rewritten_whole_at_most_every_rewrite_s(object_store, tmp_path):
  lines = writer.JsonLines(str(tmp_path), 7, rewrite_s=3600)
  path = tmp_path / "metrics-000000007.jsonl"
  lines.write('{"step": 8}\n')
  assert path.read_text() == '{"step": 8}\n'  # the first line at once: the file exists early
  lines.write('{"step": 9}\n')
  assert path.read_text() == '{"step": 8}\n'
  lines.close()
  assert path.read_text() == '{"step": 8}\n{"step": 9}\n'


def test_local_metrics_stay_one_appended_file(tmp_path):
  _segment(tmp_path, 0, 2)
  _segment(tmp_path, 1, 3)
  assert [p.name for p in tmp_path.glob("metrics*")] == ["metrics.jsonl"]
  assert _steps(tmp_path) == [("eval", 0), ("train", 1), ("train", 2), ("eval", 1), ("train", 2),
                              ("train", 3)]


class _FakeWandb:
  """Records `wandb.init` calls as W&B would receive them, without starting W&B."""

  def __init__(self):
    self.inits = []

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, *args, **kwargs):
    del args, kwargs

  def finish(self):
    pass


def test_every_launch_of_a_run_logs_to_the_same_wandb_run(tmp_path, monkeypatch):
  from jaxfm.train.writer import MetricWriter
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  for start in (0, 7):  # the first launch, then a relaunch after a preemption
    MetricWriter(str(tmp_path / "run"), "proj", {}, start_step=start).close()
  MetricWriter(str(tmp_path / "other"), "proj", {}).close()
  ids = [init["id"] for init in fake.inits]
  assert ids[0] == ids[1] != ids[2] and all(init["resume"] == "allow" for init in fake.inits)
  assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == ids[0]


def test_wandb_offline_run_resumes_by_id(tmp_path, monkeypatch):
  wandb = pytest.importorskip("wandb")
  from jaxfm.train.writer import MetricWriter
  monkeypatch.setenv("WANDB_MODE", "offline")
  ids = []
  for step in (1, 2):  # a launch, then a relaunch in the same workdir
    writer = MetricWriter(str(tmp_path), "jaxfm-test", {})
    writer.write(step, {"loss": 1.0 / step})
    ids.append(wandb.run.id)
    writer.close()
  assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()
