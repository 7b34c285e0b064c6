"""Post-training int8 (`jaxfm.compress`, `jaxfm.quantize`) on a tiny fine-tuned classifier: int8
logits near the float ones, w8a8's arithmetic against a numpy int8 reference, the saved folder
(int8 arrays, ~4x smaller, read back exactly), the eval step `evaluate` and `predict` run over
it on a mesh, and one-line errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import safetensors.numpy

qwix = pytest.importorskip("qwix")  # the `quant` extra

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import compress, sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import inference, int8_dir, quantize
from jaxfm.finetuning import run
from jaxfm.models import BertConfig, preset, stack_layers, unstack_layers
from jaxfm.models.encoder import EMBED, MLP, dense
from jaxfm.tasks import load_split, make_task
from jaxfm.train import loop
from jaxfm.trees import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """A fine-tuned tiny sentiment workdir, its dev split and its best params."""
  root = tmp_path_factory.mktemp("quantize")
  cfg = ff.config("classification", str(ff.write_model_dir(root)), *ff.write_sentiment(root),
                  epochs=2.0)
  workdir = str(root / "sst")
  run.finetune(cfg, workdir)
  saved = workdir_lib.load_run(workdir)
  split, _ = load_split("classification", saved.cfg.data, saved.cfg.data.dev_file,
                        saved.tokenizer.backend, saved.label_names)
  return workdir, split, weights.workdir_params(workdir).params


def _model(workdir: str) -> nn.Module:
  saved = workdir_lib.load_run(workdir)
  return make_task("classification", config_lib.bert_config(saved.cfg, "cpu"),
                   saved.label_names, None, saved.cfg.data).model


def _batch(split) -> tuple[np.ndarray, ...]:
  batch = next(split.eval_batches(40, 0, 1))
  return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


def _logits(model: nn.Module, params, inputs, mode: str | None = None) -> np.ndarray:
  if mode is None:
    return np.asarray(jax.jit(lambda p: model.apply({"params": p}, *inputs))(params))
  int8_model = quantize.compute_model(model, mode)
  forward = lambda p: int8_model.apply({"params": quantize.dequantize_params(p)}, *inputs)
  return np.asarray(jax.jit(forward)(params))


@pytest.mark.parametrize("mode, tolerance", [("weight_only", 0.01), ("w8a8", 0.02)])
def test_int8_logits_are_close_to_float_logits(finetuned, mode, tolerance):
  # Each int8 step is 1/127 of its channel's (or token's) largest magnitude, so a weight or
  # activation moves by at most 0.4% of that, and the errors of a sum of products mostly cancel:
  # the logits move by 0.25% (weight-only) and 0.5% (w8a8) of their largest. The bounds are four
  # times that; a dropped or misplaced scale moves them by tens of percent.
  workdir, split, params = finetuned
  model, inputs = _model(workdir), _batch(split)
  exact = _logits(model, params, inputs)
  int8 = _logits(model, quantize.quantize_params(params), inputs, mode)
  error = np.abs(int8 - exact).max() / np.abs(exact).max()
  assert 0 < error <= tolerance
  assert (int8.argmax(-1) == exact.argmax(-1)).mean() >= 0.95


class _Projection(nn.Module):
  """One of the encoder's Dense layers (`models.encoder.dense`) on its own."""

  config: BertConfig

  @nn.compact
  def __call__(self, x):
    return dense(self.config, 8, (EMBED, MLP), "projection")(x)


def test_w8a8_is_per_token_int8_times_per_channel_int8():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)  # [batch, length, in]
  module = _Projection(preset("tiny", cpu_paths=True))
  params = nn.meta.unbox(module.init(jax.random.key(0), x)["params"])
  params["projection"]["bias"] = np.linspace(-1, 1, 8, dtype=np.float32)
  int8 = quantize.quantize_params(params)
  ours = quantize.compute_model(module, "w8a8").apply(
      {"params": quantize.dequantize_params(int8)}, x)
  # The reference: symmetric int8 (step absmax / 127), a scale per token and per output column.
  w = np.asarray(params["projection"]["kernel"])  # [in, out]
  x_scale = np.abs(x).max(-1, keepdims=True) / 127  # [batch, length, 1]
  w_scale = np.abs(w).max(0, keepdims=True) / 127  # [1, out]
  products = np.round(x / x_scale).astype(np.int32) @ np.round(w / w_scale).astype(np.int32)
  reference = products * x_scale * w_scale + params["projection"]["bias"]
  np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_w8a8_multiplies_every_weight_in_int8_and_attention_in_float(finetuned):
  workdir, split, params = finetuned
  model, inputs = _model(workdir), _batch(split)
  int8 = quantize.quantize_params(params)
  layers = model.config.num_layers

  def int8_dots(mode: str) -> tuple[int, int]:
    int8_model = quantize.compute_model(model, mode)
    text = jax.jit(lambda p: int8_model.apply({"params": quantize.dequantize_params(p)},
                                              *inputs)).lower(int8).as_text()
    dots = re.findall(r"stablehlo.dot_general.*", text)
    return len(dots), sum("xi8>" in d.split("->")[0] for d in dots)
  total, int8_count = int8_dots("w8a8")
  assert int8_count == total - 2 * layers  # all but each layer's scores and context
  assert int8_dots("weight_only")[1] == 0


def test_requantizing_the_stored_weights_gives_them_back(finetuned):
  # What w8a8's matmuls multiply by is the saved int8 checkpoint.
  stored = [x for x in jax.tree.leaves(quantize.quantize_params(finetuned[2]),
                                       is_leaf=quantize.is_quantized)
            if quantize.is_quantized(x)]
  # The tables; per layer qkv, out, intermediate and output; the pooler and the head.
  assert len(stored) == 3 + 4 * 2 + 2
  assert max(np.abs(q.qvalue).max() for q in stored) == 127
  for q in stored:
    axes = tuple(i for i, n in enumerate(q.scale.shape) if n > 1)
    again = qwix.quantize(qwix.dequantize(q), np.int8, channelwise_axes=axes,
                          calibration_method=quantize.CALIBRATION)
    np.testing.assert_array_equal(again.qvalue, q.qvalue)
    np.testing.assert_allclose(again.scale, q.scale, rtol=1e-6)


def test_scanned_layout_quantizes_per_layer_as_the_unrolled_one(finetuned):
  unrolled = unstack_layers(finetuned[2])
  as_dicts = lambda tree: jax.tree.map(  # pylint: disable=unnecessary-lambda-assignment
      lambda q: {"qvalue": q.qvalue, "scale": q.scale} if quantize.is_quantized(q) else q,
      tree, is_leaf=quantize.is_quantized)
  expected = flatten(stack_layers(as_dicts(jax.device_get(quantize.quantize_params(unrolled)))))
  scanned = flatten(as_dicts(jax.device_get(quantize.quantize_params(stack_layers(unrolled)))))
  assert expected.keys() == scanned.keys()
  for name, value in expected.items():
    np.testing.assert_array_equal(scanned[name], value, err_msg=name)


def _cli(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxfm.quantize", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def int8_folder(finetuned, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("int8") / "w8a8")
  done = _cli(f"--workdir={finetuned[0]}", f"--out={out}", "--mode=w8a8")
  assert done.returncode == 0, done.stderr[-3000:]
  return out, json.loads(done.stdout.strip().splitlines()[-1])


def test_saved_folder_holds_int8_arrays_and_is_four_times_smaller(finetuned, int8_folder):
  out, report = int8_folder
  entries = safetensors.numpy.load_file(os.path.join(out, int8_dir.PARAMS_FILE))
  float_params = flatten(finetuned[2])
  for name, value in float_params.items():
    if name.endswith(("kernel", "embedding")):
      assert entries[f"{name}/qvalue"].dtype == np.int8 and f"{name}" not in entries
      assert entries[f"{name}/qvalue"].shape == value.shape
      assert entries[f"{name}/scale"].dtype == np.float32
      # One scale per output channel (per row of a table): the contracted axes have none.
      contracted = 2 if name.endswith("out_kernel") else 1
      expected = ((value.shape[0], 1) if name.endswith("embedding")
                  else (1,) * contracted + value.shape[contracted:])
      assert entries[f"{name}/scale"].shape == expected, name
    else:
      assert entries[name].dtype == np.float32
  float_bytes = sum(np.asarray(v).nbytes for v in float_params.values())
  assert report["float32_bytes"] == float_bytes
  assert 3.5 < float_bytes / os.path.getsize(os.path.join(out, int8_dir.PARAMS_FILE)) < 4.0
  assert workdir_lib.load_run(out).label_names == workdir_lib.load_run(finetuned[0]).label_names


@pytest.mark.parametrize("mode", compress.MODES)
def test_saved_and_read_back_computes_exactly_the_in_memory_int8_model(finetuned, int8_folder,
                                                                       mode):
  workdir, split, params = finetuned
  model, inputs = _model(workdir), _batch(split)
  read = int8_dir.read(int8_folder[0])
  assert read.mode == "w8a8" and "best checkpoint" in read.describe()
  np.testing.assert_array_equal(_logits(model, read.params, inputs, mode),
                                _logits(model, quantize.quantize_params(params), inputs, mode))


def test_int8_eval_step_scores_the_split_on_the_mesh(finetuned, int8_folder):
  workdir, split, _ = finetuned
  out = int8_folder[0]
  saved = workdir_lib.load_run(out)
  task = make_task("classification", config_lib.bert_config(saved.cfg, "cpu"), saved.label_names,
                   split, saved.cfg.data)
  mesh = loop.make_mesh(saved.cfg)
  ready = compress.int8_inference(out, saved.cfg, task, mesh)
  qvalues = [x for x in jax.tree.leaves(ready.params) if x.dtype == np.int8]
  assert qvalues and all(len(x.sharding.device_set) == 8 for x in qvalues)
  batches = split.eval_batches(saved.cfg.train.batch_size, 0, 1,
                               config_lib.length_buckets(saved.cfg.data))
  with sharding.activation_sharding(mesh):
    metrics = loop.evaluate(ready.task, ready.steps, ready.params, batches, mesh)
  expected = run.evaluate(workdir, "dev")
  assert metrics["accuracy"] == pytest.approx(expected["accuracy"], abs=1 / len(split.examples))
  assert metrics["loss"] == pytest.approx(expected["loss"], rel=0.05)


def test_evaluate_and_predict_read_an_int8_folder_as_a_workdir(finetuned, int8_folder, tmp_path):
  workdir, split, _ = finetuned
  out = int8_folder[0]
  ours, theirs = run.evaluate(out, "dev"), run.evaluate(workdir, "dev")
  assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1 / len(split.examples))
  inputs = tmp_path / "in.jsonl"
  inputs.write_text('{"sentence": "the film was great"}\n{"sentence": "a very awful plot"}\n')
  rows = run.predict(out, str(inputs))
  assert [r["label"] for r in rows] == [r["label"] for r in run.predict(workdir, str(inputs))]
  assert not os.path.exists(os.path.join(out, "checkpoints"))  # nothing written into the folder


def test_a_folder_that_does_not_fit_its_model_is_refused(finetuned, int8_folder):
  workdir, split, _ = finetuned
  saved = workdir_lib.load_run(workdir)
  task = inference.int8_task(make_task("classification", config_lib.bert_config(saved.cfg, "cpu"),
                                       saved.label_names, split, saved.cfg.data),
                             "classification", "w8a8")
  steps = loop.build_steps(saved.cfg, task, loop.make_mesh(saved.cfg))
  params = int8_dir.read(int8_folder[0]).params
  del params["classifier"]["kernel"]
  with pytest.raises(ValueError, match="int8.safetensors: classifier/kernel holds nothing"):
    inference.int8_steps(steps, params, int8_folder[0])


@pytest.mark.parametrize("args, message", [
    (["--workdir={root}/missing", "--out={root}/a"],
     "error: {root}/missing is not a jaxfm fine-tuning workdir: config.json is missing"),
    (["--workdir={workdir}", "--out={root}/b", "--mode=int4"],
     "error: unknown quantization mode 'int4'; choose one of weight_only, w8a8"),
    (["--workdir={workdir}", "--out={int8}"], "error: {int8} already exists and is not an "
     "empty directory"),
])
def test_bad_input_is_one_line(finetuned, int8_folder, tmp_path, args, message):
  names = {"root": str(tmp_path), "workdir": finetuned[0], "int8": int8_folder[0]}
  done = _cli(*(a.format(**names) for a in args))
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [message.format(**names)]
