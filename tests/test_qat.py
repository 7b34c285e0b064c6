"""Quantization-aware fine-tuning (`quantize.qat`, `jaxfm.compress.qat`) on a tiny sentiment
task: the hooked loss computes what the int8 export computes and passes gradients straight
through, a QAT run learns, its eval scores its int8 export (exactly for weight-only, to
activation rounding for w8a8; a float run's eval does not), a preempted run resumes exactly,
and a bad value is refused by name."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")  # the `quant` extra

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm import workdir as workdir_lib
from jaxfm.compress import quantize
from jaxfm.compress.qat import qat_task
from jaxfm.finetuning import run
from jaxfm.models import preset
from jaxfm.tasks import load_split, make_task
from jaxfm.train import checkpoint, loop
from jaxfm.trees import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("qat")
  return root, str(ff.write_model_dir(root)), ff.write_sentiment(root)


def _config(files, qat: str):
  root, model_dir, (train, dev) = files
  cfg = ff.config("classification", model_dir, train, dev)
  cfg.quantize.qat = qat
  return cfg


@pytest.fixture(scope="module")
def qat_run(files):
  workdir = str(files[0] / "qat")
  result, best_step = run.finetune(_config(files, "w8a8"), workdir)
  return workdir, result, best_step


@pytest.fixture(scope="module")
def float_run(files):
  workdir = str(files[0] / "float")
  run.finetune(_config(files, ""), workdir)
  return workdir


# ---------------------------------------------------------------- the hook

@pytest.fixture(scope="module", params=[False, True], ids=["unrolled", "scanned"])
def tiny(request):
  """A float classification task (layers unrolled or scanned), its params and one batch."""
  config = preset("tiny", vocab_size=40, max_position_embeddings=ff.SEQ, cpu_paths=True,
                  scan_layers=request.param)
  task = make_task("classification", config, ["0", "1"], None, config_lib.finetune_defaults().data)
  params = jax.device_get(sharding.unbox(task.init_params(jax.random.key(0))))
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(5, 40, (6, 16)).astype(np.int32),
           "token_type_ids": np.zeros((6, 16), np.int32),
           "attention_mask": np.ones((6, 16), np.int32),
           "labels": rng.integers(2, size=6).astype(np.int32),
           "weights": np.ones(6, np.float32), "feature_index": np.arange(6, dtype=np.int32)}
  return task, params, batch


@pytest.mark.parametrize("mode", ["weight_only", "w8a8"])
def test_qat_logits_are_the_int8_exports(tiny, mode):
  # The QAT task takes float params and computes what the int8 params `jaxfm.quantize` saves
  # compute in `mode`; the float task (no hook) is a quantization error away.
  task, params, batch = tiny
  inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  ours = jax.jit(qat_task(task, "classification", mode).predict_fn)(params, batch)["logits"]
  int8_model = quantize.compute_model(task.model, mode)
  exported = jax.jit(lambda p: int8_model.apply({"params": quantize.dequantize_params(p)},
                                                *inputs))(quantize.quantize_params(params))
  plain = jax.jit(task.predict_fn)(params, batch)["logits"]
  np.testing.assert_allclose(ours, exported, rtol=0, atol=1e-6)
  assert np.abs(plain - exported).max() > 100 * max(np.abs(ours - exported).max(), 1e-7)


def test_fake_quantize_rounds_forward_and_passes_gradients_straight_through(tiny):
  params = tiny[1]
  rounded = quantize.dequantize_params(quantize.quantize_params(params))
  faked = quantize.fake_quantize(params)
  for name, value in flatten(rounded).items():
    np.testing.assert_array_equal(flatten(faked)[name], value, err_msg=name)
  weights = jax.tree.map(lambda x: jnp.linspace(-1, 1, x.size).reshape(x.shape), params)
  grads = jax.grad(lambda p: sum(jnp.vdot(w, x) for w, x in zip(
      jax.tree.leaves(weights), jax.tree.leaves(quantize.fake_quantize(p)))))(params)
  for name, value in flatten(weights).items():
    np.testing.assert_allclose(flatten(grads)[name], value, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------- runs

def _train_losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


def test_qat_run_learns(qat_run):
  workdir, result, _ = qat_run
  losses = _train_losses(workdir)
  assert losses[-1] < 0.3 * losses[0]
  assert result.eval["accuracy"] >= 0.9


def _dev_logits(workdir: str) -> np.ndarray:
  """[dev examples, 2]: what `evaluate` and `predict` compute on the dev split."""
  saved = workdir_lib.load_run(workdir)
  split, _ = load_split("classification", saved.cfg.data, saved.cfg.data.dev_file,
                        saved.tokenizer.backend, saved.label_names)
  job = run.inference(workdir, saved, split)
  with sharding.activation_sharding(job.mesh):
    return loop.predict(job.steps, job.params, job.batches(), job.mesh)["logits"]


def _quantize_cli(workdir: str, out: str, *args: str) -> dict:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "jaxfm.quantize", f"--workdir={workdir}",
                         f"--out={out}", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def _export_gap(workdir: str, out: str, *args: str) -> np.ndarray:
  """|logits of `workdir` - logits of its int8 export|, [dev examples, 2]."""
  _quantize_cli(workdir, out, *args)
  return np.abs(_dev_logits(workdir) - _dev_logits(out))


@pytest.fixture(scope="module")
def weight_only_run(files):
  workdir = str(files[0] / "qat-weight_only")
  return workdir, run.finetune(_config(files, "weight_only"), workdir)[1]


def _eval_at(workdir: str, step: int) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return next(r for r in map(json.loads, f) if r["split"] == "eval" and r["step"] == step)


def test_weight_only_qat_eval_is_its_int8_exports(weight_only_run, float_run, files):
  # Weight-only export computes in float with the rounded weights the QAT steps used: the same
  # logits to float rounding; a float run's export is a quantization error away.
  workdir, best_step = weight_only_run
  qat_gap = _export_gap(workdir, str(files[0] / "wo-int8"))  # the mode it trained for
  ptq_gap = _export_gap(float_run, str(files[0] / "float-wo-int8"), "--mode=weight_only")
  assert qat_gap.max() <= 1e-5 and ptq_gap.max() > 100 * max(qat_gap.max(), 1e-7)
  # `evaluate` of the int8 folder scores what training's eval of the kept checkpoint scored.
  trained, scored = _eval_at(workdir, best_step), run.evaluate(str(files[0] / "wo-int8"), "dev")
  assert scored["accuracy"] == trained["accuracy"]
  assert scored["loss"] == pytest.approx(trained["loss"], rel=1e-5)


def test_w8a8_qat_eval_is_its_int8_exports_to_activation_rounding(qat_run, float_run, files):
  # w8a8 rounds each activation per token, so a last-bit difference between the training eval
  # step and the int8 eval step sometimes lands on the neighbouring int8 step: the logits
  # agree to a few such steps, far closer than a float run's and its export's.
  workdir, _, best_step = qat_run
  report = _quantize_cli(workdir, str(files[0] / "qat-int8"))
  assert report["mode"] == "w8a8"  # the mode it trained for
  qat_gap = np.abs(_dev_logits(workdir) - _dev_logits(str(files[0] / "qat-int8")))
  ptq_gap = _export_gap(float_run, str(files[0] / "float-int8"), "--mode=w8a8")
  assert qat_gap.mean() < 0.25 * ptq_gap.mean()
  trained, scored = _eval_at(workdir, best_step), run.evaluate(str(files[0] / "qat-int8"), "dev")
  assert scored["accuracy"] == trained["accuracy"]
  assert scored["loss"] == pytest.approx(trained["loss"], rel=1e-3)


def test_preempted_qat_run_resumes_exactly(qat_run, files, monkeypatch):
  straight_dir, straight, _ = qat_run
  workdir = str(files[0] / "qat-resumed")
  iterator = run.loader.feature_train_iterator
  monkeypatch.setattr(run.loader, "feature_train_iterator",
                      lambda *a, **k: ff.SigtermAtBatch(iterator(*a, **k), 7))
  first, _ = run.finetune(_config(files, "w8a8"), workdir)
  assert first.preempted and first.step == 7
  monkeypatch.setattr(run.loader, "feature_train_iterator", iterator)
  resumed, _ = run.finetune(_config(files, "w8a8"), workdir)
  assert resumed.step == straight.step and resumed.eval == straight.eval
  step_a, a = checkpoint.restore_latest_params(straight_dir)
  step_b, b = checkpoint.restore_latest_params(workdir)
  assert step_a == step_b
  for name, value in flatten(a).items():
    np.testing.assert_array_equal(flatten(b)[name], value, err_msg=name)


@pytest.mark.parametrize("value, message", [
    ("int8", "quantize.qat='int8' must be '' (off) or one of weight_only, w8a8"),
    ("W8A8", "quantize.qat='W8A8' must be '' (off) or one of weight_only, w8a8"),
])
def test_a_bad_qat_value_is_refused_by_name(files, value, message):
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    run.finetune(_config(files, value), str(files[0] / "refused"))
  assert not os.path.exists(files[0] / "refused")
