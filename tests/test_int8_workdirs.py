"""Quantization-aware workdirs (`quantize.qat`) and int8 folders (`jaxfm.quantize`) where a
workdir goes: as a distillation teacher they run as `evaluate` scores them (in the step and
in the teacher cache), and `jaxfm.convert --to_hf` exports the weights their int8 model
computes with, whose transformers logits are jaxfm's weight-only int8 ones (for w8a8, the
report says what the folder cannot hold)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("qwix")  # the `quant` extra

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import int8_dir
from jaxfm.distillation import cache, losses, student
from jaxfm.distillation import run as distill_run
from jaxfm.distillation.teacher import load_teacher
from jaxfm.finetuning import run
from jaxfm.tasks import load_split, make_task
from jaxfm.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{weight_only, w8a8: QAT workdirs; w8a8-int8, w8a8-weight_only: int8 folders of the w8a8
  run in each mode} under one root with the sentiment fixtures."""
  root = tmp_path_factory.mktemp("int8_workdirs")
  model_dir = str(ff.write_model_dir(root))
  train, dev = ff.write_sentiment(root)
  paths = {"root": root}
  for mode in ("weight_only", "w8a8"):
    cfg = ff.config("classification", model_dir, train, dev)
    cfg.quantize.qat = mode
    paths[mode] = str(root / mode)
    run.finetune(cfg, paths[mode])
  for name, mode in (("w8a8-int8", "w8a8"), ("w8a8-weight_only", "weight_only")):
    paths[name] = str(root / name)
    int8_dir.write(paths["w8a8"], paths[name], mode)
  return paths


def _split(workdir: str, path: str):
  saved = workdir_lib.load_run(workdir)
  return load_split("classification", saved.cfg.data, path, saved.tokenizer.backend,
                    saved.label_names)[0]


def _evaluate_logits(workdir: str, path: str) -> np.ndarray:
  """[examples, 2]: what `evaluate` and `predict` compute on the file `path`."""
  saved = workdir_lib.load_run(workdir)
  job = run.inference(workdir, saved, _split(workdir, path))
  with sharding.activation_sharding(job.mesh):
    return loop.predict(job.steps, job.params, job.batches(), job.mesh)["logits"]


def _float_logits(workdir: str, features: dict[str, np.ndarray]) -> np.ndarray:
  """What the QAT workdir's float params compute without rounding (the teacher before)."""
  config = workdir_lib.read_model_config(workdir).replace(scan_layers=False)
  task = make_task("classification", config, ["0", "1"], None,
                   config_lib.finetune_defaults().data)
  params = weights.in_layout(weights.workdir_params(workdir).params, config)
  return np.asarray(jax.jit(task.predict_fn)(params, features)["logits"])


# ---------------------------------------------------------------- distillation teacher

def _distill_config(runs, teacher: str, **distill):
  root = runs["root"]
  cfg = config_lib.distill_defaults()
  base = ff.config("classification", "", str(root / "train.tsv"), str(root / "dev.tsv"))
  for section in ("data", "train", "optim", "model"):
    cfg[section].update(base[section].to_dict())
  cfg.teacher = runs[teacher]
  cfg.model.num_layers = 1
  cfg.distill.update(distill)
  return cfg


def _teacher(cfg):
  """The teacher `cfg` names and the task the distillation step runs it with."""
  teacher = load_teacher(cfg)
  student.take_architecture(cfg, teacher)
  settings = distill_run.loss_settings(cfg, teacher)
  return teacher, distill_run._tasks(cfg, teacher, None, settings)[2]


@pytest.mark.parametrize("name, mode", [("weight_only", "weight_only"), ("w8a8", "w8a8"),
                                        ("w8a8-int8", "w8a8")])
def test_int8_teacher_cache_holds_the_logits_evaluate_gives(runs, name, mode, tmp_path):
  # k = 2 keeps both logits: the cache pass runs the teacher on the training set as the
  # workdir's evaluate does (the same int8 model), not its float params. Weight-only agrees to
  # float rounding; w8a8 also where no activation of the two compiled programs differs in a
  # last bit that moves it to the neighbouring int8 step (as `tests/test_qat.py` measures).
  cfg = _distill_config(runs, name, teacher_top_k=2, teacher_cache=str(tmp_path / "cache"))
  teacher, teacher_task = _teacher(cfg)
  assert teacher.int8_mode == mode and teacher.source.startswith(f"int8 {mode} params of the")
  train = _split(runs[name], cfg.data.train_file)
  cached = cache.teacher_outputs(cfg, teacher, teacher_task, train.device_arrays())
  ours = cached[cache.VALUES][:, 0]
  want = _evaluate_logits(runs[name], cfg.data.train_file)
  float_gap = np.abs(_float_logits(runs["w8a8" if name == "w8a8-int8" else name],
                                   train.device_arrays()) - want)
  gap = np.abs(ours - want)
  assert np.mean(gap <= 1e-5) >= (1.0 if mode == "weight_only" else 0.95)
  assert float_gap.mean() > 100 * max(gap.mean(), 1e-7)


def test_w8a8_teacher_in_the_step_gives_the_kl_to_evaluates_logits(runs):
  # A random student on the dev split as one batch: the step's kl against its teacher is the
  # kl against the logits `evaluate` gives for the QAT workdir; the losses that read inside
  # the encoders read the int8 teacher's states as the float one's.
  cfg = _distill_config(runs, "w8a8", student_init="random",
                        losses="kl=1.0,hidden=1.0,attention=1.0")
  cfg.model.update(hidden_size=64, num_heads=2, intermediate_size=128)
  teacher, _ = _teacher(cfg)
  task, init_trainable, _ = distill_run._tasks(cfg, teacher, None,
                                               distill_run.loss_settings(cfg, teacher))
  params = {**sharding.unbox(init_trainable(jax.random.key(0))), "teacher": teacher.params}
  dev = _split(runs["w8a8"], cfg.data.dev_file)
  batch = {**dev.device_arrays(), "labels": dev.features["labels"]}
  sums = jax.jit(task.loss_fn)(params, batch, None)[1]
  student_logits = jax.jit(task.predict_fn)(params, batch)["logits"]
  want = losses.soft_target_kl(student_logits, _evaluate_logits(runs["w8a8"], cfg.data.dev_file),
                               batch["weights"], cfg.distill.temperature)
  floated = losses.soft_target_kl(student_logits, _float_logits(runs["w8a8"], batch),
                                  batch["weights"], cfg.distill.temperature)
  assert float(sums["kl_sum"]) == pytest.approx(float(want), rel=1e-5)
  assert float(floated) != pytest.approx(float(want), rel=1e-4)  # the float params' kl
  assert all(np.isfinite(float(sums[n])) and float(sums[n]) > 0
             for n in ("hidden_sum", "attention_sum"))


def test_a_cache_of_the_same_int8_values_in_another_mode_is_refused(runs, tmp_path):
  # The weight-only and w8a8 folders of one run hold the same int8 values (same sha256), but
  # their teachers compute differently: the cache's manifest tells them apart.
  made = _distill_config(runs, "w8a8-weight_only", teacher_top_k=2,
                         teacher_cache=str(tmp_path / "cache"))
  teacher, teacher_task = _teacher(made)
  features = _split(runs["w8a8"], made.data.train_file).device_arrays()
  cache.teacher_outputs(made, teacher, teacher_task, features)
  other = _distill_config(runs, "w8a8-int8", teacher_top_k=2,
                          teacher_cache=str(tmp_path / "cache"))
  w8a8_teacher, w8a8_task = _teacher(other)
  assert w8a8_teacher.sha256 == teacher.sha256
  with pytest.raises(config_lib.ConfigError, match=r"^teacher=.*differs from what distill."
                     r"teacher_cache=.*teacher_int8 'weight_only', this run 'w8a8'"):
    cache.teacher_outputs(other, w8a8_teacher, w8a8_task, features)


# ---------------------------------------------------------------- Hugging Face export

def _to_hf(source: str, out: str) -> str:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  done = subprocess.run([sys.executable, "-m", "jaxfm.convert", "--to_hf", f"--from={source}",
                         f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def _transformers_logits(hf_dir: str, features: dict[str, np.ndarray]) -> np.ndarray:
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
  inputs = {name: torch.tensor(features[name], dtype=torch.long)
            for name in ("input_ids", "token_type_ids", "attention_mask")}
  with torch.no_grad():
    return model(**inputs).logits.numpy()


def test_weight_only_qat_workdir_exports_its_int8_model_to_transformers(runs, tmp_path):
  workdir = runs["weight_only"]
  report = _to_hf(workdir, str(tmp_path / "hf"))
  assert "params: int8 weight_only params of the best checkpoint" in report
  assert "note:" not in report
  dev = _split(workdir, str(runs["root"] / "dev.tsv")).device_arrays()
  theirs = _transformers_logits(str(tmp_path / "hf"), dev)
  ours = _evaluate_logits(workdir, str(runs["root"] / "dev.tsv"))
  np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
  assert np.abs(_float_logits(workdir, dev) - ours).max() > 100 * np.abs(theirs - ours).max()


def test_w8a8_workdir_and_its_int8_folder_export_the_int8_weights_and_say_what_is_lost(
    runs, tmp_path):
  # transformers runs the w8a8 model's weights on float activations: jaxfm's weight-only
  # model of the same int8 values, an activation rounding away from the w8a8 logits.
  safetensors = pytest.importorskip("safetensors.numpy")
  dev_file = str(runs["root"] / "dev.tsv")
  exported = {}
  for name in ("w8a8", "w8a8-int8"):
    report = _to_hf(runs[name], str(tmp_path / name))
    assert "params: int8 w8a8 params of the best checkpoint" in report
    assert "note: w8a8 also rounds each matmul's activations" in report
    exported[name] = safetensors.load_file(str(tmp_path / name / "model.safetensors"))
  assert exported["w8a8"].keys() == exported["w8a8-int8"].keys()
  for key, value in exported["w8a8"].items():
    np.testing.assert_array_equal(exported["w8a8-int8"][key], value, err_msg=key)
  query = exported["w8a8"]["bert.encoder.layer.0.attention.self.query.weight"]  # [out, in]
  assert max(len(np.unique(row)) for row in query) <= 255  # an int8 grid per output channel
  theirs = _transformers_logits(str(tmp_path / "w8a8"),
                                _split(runs["w8a8"], dev_file).device_arrays())
  weight_only = _evaluate_logits(runs["w8a8-weight_only"], dev_file)
  np.testing.assert_allclose(theirs, weight_only, rtol=0, atol=1e-5)
  assert np.abs(theirs - _evaluate_logits(runs["w8a8"], dev_file)).max() > 1e-4


def test_fine_tuning_from_an_int8_folder_is_refused_by_name(runs):
  cfg = ff.config("classification", runs["w8a8-int8"], *ff.write_sentiment(runs["root"]))
  with pytest.raises(config_lib.ConfigError, match=r"is an int8 folder \(jaxfm.quantize\): "
                     r"start from the workdir it was quantized from"):
    run.finetune(cfg, str(runs["root"] / "from_int8"))
