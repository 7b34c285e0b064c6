"""Structured pruning (`jaxfm.compress.pruning`, `jaxfm.prune`) on a tiny fine-tuned classifier:
smaller shapes and parameter counts, share 0 changes nothing, a pruned head or neuron computes
what the unpruned model computes with it masked, gradient importance is the gate's derivative,
the pruned workdir is read by evaluate, predict, finetune (LoRA too; prefix tuning is refused)
and convert (transformers loads the export with matching logits; it imports back), a recovery
in the same command (fine-tuning or distillation) is what evaluate scores, keeps the pruned
model's scores and resumes after a SIGTERM, and bad input is a clear error."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import safetensors.numpy

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import distillation, interop, sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import prune_run, pruning
from jaxfm.finetuning import run
from jaxfm.interop import hf_names
from jaxfm.models import BertConfig, preset
from jaxfm.tasks import load_split, make_task
from jaxfm.train import flops, loop
from jaxfm.trees import flatten, unflatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  """A fine-tuned tiny sentiment workdir (2 layers x 2 heads, FFN 512), its data files, dev
  split, architecture and best params."""
  root = tmp_path_factory.mktemp("pruning")
  files = ff.write_sentiment(root)
  cfg = ff.config("classification", str(ff.write_model_dir(root)), *files, epochs=2.0)
  workdir = str(root / "sst")
  run.finetune(cfg, workdir)
  saved = workdir_lib.load_run(workdir)
  split, _ = load_split("classification", saved.cfg.data, saved.cfg.data.dev_file,
                        saved.tokenizer.backend, saved.label_names)
  config = config_lib.bert_config(saved.cfg, "cpu")
  return workdir, files, split, config, weights.workdir_params(workdir).params


def _model(config: BertConfig) -> nn.Module:
  data = config_lib.finetune_defaults().data
  data.max_seq_length = ff.SEQ
  return make_task("classification", config, ["0", "1"], None, data).model


def _inputs(split) -> tuple[np.ndarray, ...]:
  batch = next(split.eval_batches(40, 0, 1))
  return batch["input_ids"], batch["token_type_ids"], batch["attention_mask"]


def _logits(config: BertConfig, params, inputs) -> np.ndarray:
  return np.asarray(jax.jit(lambda p: _model(config).apply({"params": p}, *inputs))(params))


def test_pruned_shapes_and_parameter_count(finetuned):
  _, _, _, config, params = finetuned
  kept = pruning.plan(config, pruning.magnitude_scores(params, config), 0.5, 0.25)
  pruned, small = pruning.apply(params, config, kept)
  # 4 heads, half of them go, never a layer's last: one per layer stays.
  assert [small.layer_heads(i) for i in range(2)] == [1, 1]
  assert small.intermediate_size == 384 and small.num_heads == 2
  flat = flatten(pruned)
  assert flat["encoder/layer_0/attention/qkv_kernel"].shape == (128, 3, 1, 64)
  assert flat["encoder/layer_1/attention/out_kernel"].shape == (1, 64, 128)
  assert flat["encoder/layer_0/intermediate/kernel"].shape == (128, 384)
  assert flat["encoder/layer_1/output/kernel"].shape == (384, 128)
  # Per layer: a head is 4 x 128 x 64 weights + 3 x 64 biases, a neuron 2 x 128 + 1.
  removed = 2 * (4 * 128 * 64 + 3 * 64) + 2 * 128 * (2 * 128 + 1)
  assert pruning.count_params(params) - pruning.count_params(pruned) == removed
  # The smaller architecture builds exactly these shapes.
  abstract = jax.eval_shape(lambda: _model(small).init(jax.random.key(0), *_dummy()))
  assert {k: v.shape for k, v in flatten(nn.meta.unbox(abstract["params"])).items()} == {
      k: v.shape for k, v in flat.items()}


def _dummy() -> tuple[np.ndarray, ...]:
  ids = np.zeros((1, 8), np.int32)
  return ids, ids, np.ones_like(ids)


def test_share_zero_leaves_the_model_unchanged(finetuned):
  _, _, _, config, params = finetuned
  kept = pruning.plan(config, pruning.magnitude_scores(params, config), 0.0, 0.0)
  pruned, same = pruning.apply(params, config, kept)
  assert same == config and same.pruned_heads == ()
  for name, value in flatten(params).items():
    np.testing.assert_array_equal(flatten(pruned)[name], value)


def test_pruning_equals_masking(finetuned):
  _, _, split, config, params = finetuned
  inputs = _inputs(split)
  rng = np.random.default_rng(0)
  neurons = tuple(np.sort(rng.choice(512, 300, replace=False)) for _ in range(2))
  kept = pruning.Plan(heads=((0,), (0, 1)), neurons=neurons)
  pruned, small = pruning.apply(params, config, kept)
  assert small.pruned_heads == ((1,), ())
  masked = dict(flatten(params))
  masked["encoder/layer_0/attention/out_kernel"] = np.asarray(
      masked["encoder/layer_0/attention/out_kernel"]).copy()
  masked["encoder/layer_0/attention/out_kernel"][1] = 0.0  # head 1's gate at 0
  for i in range(2):
    name = f"encoder/layer_{i}/output/kernel"
    gate = np.zeros(512, np.float32)
    gate[neurons[i]] = 1.0
    masked[name] = np.asarray(masked[name]) * gate[:, None]
  expected = _logits(config, unflatten(masked), inputs)
  np.testing.assert_allclose(_logits(small, pruned, inputs), expected, atol=1e-5)
  assert np.abs(expected - _logits(config, params, inputs)).max() > 1e-3  # masking mattered


def test_gradient_importance_is_the_gate_derivative(finetuned):
  # dL/dg of a gate g on head h is the derivative of the loss along out_kernel[h] scaled by g.
  _, _, split, config, params = finetuned
  task = make_task("classification", config, ["0", "1"], None, _data())
  batch = next(split.eval_batches(40, 0, 1))
  scores = pruning.gradient_scores(task.loss_fn, params, config, [batch])
  loss = jax.jit(lambda p: task.loss_fn(p, batch, None)[0])

  def gated(layer: int, head: int, g: float) -> float:
    flat = {k: np.asarray(v, np.float64) for k, v in flatten(params).items()}
    name = f"encoder/layer_{layer}/attention/out_kernel"
    flat[name][head] *= g
    return float(loss(jax.tree.map(lambda x: x.astype(np.float32), unflatten(flat))))

  eps = 1e-2
  for layer, head in ((0, 0), (1, 1)):
    numeric = abs(gated(layer, head, 1 + eps) - gated(layer, head, 1 - eps)) / (2 * eps)
    assert scores.heads[layer][head] == pytest.approx(numeric, rel=0.05, abs=1e-4)


def _data():
  data = config_lib.finetune_defaults().data
  data.max_seq_length = ff.SEQ
  return data


def test_bad_shares_are_clear_errors(finetuned):
  _, _, _, config, params = finetuned
  scores = pruning.magnitude_scores(params, config)
  with pytest.raises(ValueError, match=r"prune.heads_share=0.9 removes 4 of 4 heads; at most 2"):
    pruning.plan(config, scores, 0.9, 0.0)
  with pytest.raises(ValueError, match=r"prune.ffn_share=1.0: must be in \[0, 1\)"):
    pruning.plan(config, scores, 0.0, 1.0)
  with pytest.raises(ValueError, match=r"prune.heads_share=-0.1"):
    pruning.plan(config, scores, -0.1, 0.0)
  cfg = config_lib.prune_defaults()
  cfg.init_from, cfg.data.train_file, cfg.data.dev_file = "w", "t", "d"
  cfg.prune.heads_share = 1.5
  with pytest.raises(config_lib.ConfigError, match=r"prune.heads_share"):
    config_lib.validate_prune(cfg)


def test_pruned_heads_config_is_checked():
  config = preset("tiny")
  with pytest.raises(ValueError, match=r"pruned_heads\[0\] removes every head"):
    config.replace(pruned_heads=((0, 1), ()))
  with pytest.raises(ValueError, match=r"scan_layers=True needs the same number of heads"):
    config.replace(pruned_heads=((0,), ()), scan_layers=True)
  with pytest.raises(ValueError, match=r"distinct head index in \[0, 2\)"):
    config.replace(pruned_heads=((2,), ()))
  assert config.replace(pruned_heads=[[], []]) == config  # nothing pruned is the plain model


def _prune_config(finetuned) -> ml_collections.ConfigDict:
  workdir, (train, dev), *_ = finetuned
  cfg = config_lib.prune_defaults()
  cfg.task = "classification"
  cfg.init_from = workdir
  cfg.data.train_file, cfg.data.dev_file = train, dev
  cfg.data.max_seq_length = ff.SEQ
  cfg.train.batch_size = 16
  cfg.prune.heads_share, cfg.prune.ffn_share, cfg.prune.batches = 0.25, 0.5, 4
  return cfg


@pytest.fixture(scope="module")
def pruned_workdir(finetuned, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pruned") / "sst-pruned")
  return out, prune_run.prune(_prune_config(finetuned), out).info


def test_prune_run_writes_a_workdir_evaluate_and_predict_read(pruned_workdir, finetuned,
                                                             tmp_path):
  out, info = pruned_workdir
  assert info["heads"] in ([1, 2], [2, 1]) and info["intermediate_size"] == [512, 256]
  assert info["params"][1] < info["params"][0]
  assert json.loads((pathlib.Path(out) / prune_run.INFO_FILE).read_text())["dev"] == info["dev"]
  metrics = run.evaluate(out, "dev")
  assert metrics["accuracy"] == pytest.approx(info["dev"]["accuracy"])
  (tmp_path / "in.jsonl").write_text('{"sentence": "a good film"}\n{"sentence": "awful"}\n')
  rows = run.predict(out, str(tmp_path / "in.jsonl"))
  assert len(rows) == 2 and all("label" in r for r in rows)
  # The same command again finds the pruning finished; another one is refused.
  assert prune_run.prune(_prune_config(finetuned), out) == prune_run.Outcome(info)
  changed = _prune_config(finetuned)
  changed.prune.ffn_share = 0.25
  with pytest.raises(workdir_lib.WorkdirError, match=r"holds a pruning run with a different "
                     r"config; pass --allow_config_change .*\n  prune.ffn_share: 0.5 -> 0.25"):
    prune_run.prune(changed, out)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "file").write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is not empty"):
    prune_run.prune(_prune_config(finetuned), str(tmp_path / "other"))


def test_a_pruned_teacher_distils_into_an_every_k_student(pruned_workdir, finetuned, tmp_path):
  """The student's one layer is the teacher's top layer, with its pruned heads."""
  out, info = pruned_workdir
  _, (train, dev), *_ = finetuned
  cfg = config_lib.distill_defaults()
  base = ff.config("classification", "", train, dev)
  for section in ("data", "train", "optim", "model"):
    cfg[section].update(base[section].to_dict())
  cfg.teacher, cfg.model.num_layers = out, 1
  result, _ = distillation.distill(cfg, str(tmp_path / "student"))
  assert result.step > 0
  student = workdir_lib.load_run(str(tmp_path / "student")).cfg.model
  top = workdir_lib.load_run(out).cfg.model.pruned_heads[-1]
  assert info["heads"][-1] == 2 - len(top)
  assert list(map(list, student.get("pruned_heads", [[]]))) == [list(top)]


@pytest.mark.parametrize("task,write", [("ner", ff.write_conll), ("qa", ff.write_squad)])
def test_token_and_span_heads_prune_to_a_workdir_evaluate_reads(tmp_path, task, write):
  files = write(tmp_path)
  workdir, out = str(tmp_path / "run"), str(tmp_path / "pruned")
  run.finetune(ff.config(task, str(ff.write_model_dir(tmp_path)), *files), workdir)
  cfg = config_lib.prune_defaults()
  cfg.task, cfg.init_from = task, workdir
  cfg.data.update(workdir_lib.load_run(workdir).cfg.data.to_dict())
  cfg.prune.heads_share, cfg.prune.ffn_share, cfg.prune.batches = 0.25, 0.5, 2
  info = prune_run.prune(cfg, out).info
  assert sorted(info["heads"]) == [1, 2] and info["intermediate_size"] == [512, 256]
  assert run.evaluate(out, "dev") == pytest.approx(info["dev"])


def test_hf_export_loads_in_transformers_and_imports_back(pruned_workdir, finetuned, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out, _ = pruned_workdir
  split = finetuned[2]
  config, params, tokenizer_dir, _ = weights.load_jaxfm(out)
  assert config.pruned_heads
  hf_dir = str(tmp_path / "hf")
  interop.export_hf(params, config, hf_dir, tokenizer_dir, workdir_lib.label_names(out))
  saved = json.loads(open(os.path.join(hf_dir, "config.json")).read())
  assert saved["intermediate_size"] == 256 and saved[hf_names.PADDED_PRUNED_HEADS]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
  ids, types, mask = _inputs(split)
  with torch.no_grad():
    theirs = model(input_ids=torch.tensor(ids, dtype=torch.long),
                   token_type_ids=torch.tensor(types, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  ours = _logits(config, params, (ids, types, mask))
  np.testing.assert_allclose(theirs, ours, atol=1e-4)
  # jaxfm imports encoders (BertModel): the pruned encoder goes out and back unchanged.
  interop.export_hf({"encoder": params["encoder"]}, config, str(tmp_path / "base"))
  back = interop.import_hf(str(tmp_path / "base"), task="base")
  assert back.config.pruned_heads == config.pruned_heads
  assert back.config.intermediate_size == 256
  assert flatten(back.params).keys() == flatten({"encoder": params["encoder"]}).keys()
  for name, value in flatten(back.params).items():
    np.testing.assert_array_equal(value, flatten(params)[name])


def test_finetune_recovers_from_a_pruned_workdir(pruned_workdir, finetuned, tmp_path):
  out, _ = pruned_workdir
  _, (train, dev), *_ = finetuned
  cfg = ff.config("classification", out, train, dev, epochs=1.0)
  result, best_step = run.finetune(cfg, str(tmp_path / "recovered"))
  assert best_step is not None and "accuracy" in result.eval
  saved = workdir_lib.read_model_config(str(tmp_path / "recovered"))
  assert saved.pruned_heads == workdir_lib.read_model_config(out).pruned_heads


def _recovery_config(finetuned, **prune) -> ml_collections.ConfigDict:
  """`_prune_config` with a recovery of one epoch (10 steps) at fine-tuning's fixture rate."""
  cfg = _prune_config(finetuned)
  cfg.prune.update({"recovery_epochs": 1.0, **prune})
  cfg.optim.peak_learning_rate = 2e-3
  cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0)
  cfg.train.update(log_every=5, progress_bar=False)
  return cfg


@pytest.fixture(scope="module")
def recovered(finetuned, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("recovered") / "sst-recovered")
  return out, prune_run.prune(_recovery_config(finetuned), out)


def test_recovery_is_what_evaluate_scores_and_the_pruned_scores_are_kept(recovered, finetuned,
                                                                          pruned_workdir):
  out, outcome = recovered
  info, pruned = outcome.info, prune_run.pruned_dir(out)
  assert outcome.recovery.step == 10 and not outcome.recovery.preempted
  # The pruned model before the recovery: the pruning run without one, kept and scored.
  assert info["pruned_workdir"] == pruned and info["heads"] == pruned_workdir[1]["heads"]
  assert info["dev"] == pytest.approx(pruned_workdir[1]["dev"])
  assert run.evaluate(pruned, "dev") == pytest.approx(info["dev"])
  # The workdir holds the recovered model of the pruned architecture, trained from it.
  recovery = info["recovery"]
  assert recovery["method"] == "finetune" and recovery["epochs"] == 1.0
  assert recovery["best_step"] in range(1, 11)
  assert run.evaluate(out, "dev") == pytest.approx(recovery["dev"])
  assert workdir_lib.read_model_config(out).pruned_heads == (
      workdir_lib.read_model_config(pruned).pruned_heads)
  assert workdir_lib.read_config(out).init_from == pruned
  assert recovery["dev"]["loss"] < info["dev"]["loss"] - 0.01  # the recovery trained
  saved = json.loads((pathlib.Path(out) / prune_run.INFO_FILE).read_text())
  assert saved["recovery"] == recovery and saved["dev"] == info["dev"]
  assert saved["config"]["prune"]["recovery_epochs"] == 1.0


def test_a_finished_recovery_is_not_redone_and_another_command_is_refused(recovered, finetuned,
                                                                          monkeypatch):
  out, outcome = recovered
  monkeypatch.setattr(prune_run, "_prune_into", _fail_if_called)
  again = prune_run.prune(_recovery_config(finetuned), out)
  assert again.info == outcome.info and again.recovery.step == 10
  for field, value in (("prune.heads_share", 0.5), ("optim.peak_learning_rate", 1e-3)):
    cfg = _recovery_config(finetuned)
    cfg[field.split(".")[0]][field.split(".")[1]] = value
    with pytest.raises(workdir_lib.WorkdirError, match=rf"different config;.*\n  {field}: "):
      prune_run.prune(cfg, out)


def _fail_if_called(*args):
  raise AssertionError("pruned again")


def test_a_sigterm_during_the_recovery_resumes_to_the_uninterrupted_model(recovered, finetuned,
                                                                          tmp_path, monkeypatch):
  # An interrupted pruning (WORKDIR/pruned without pruning.json) is pruned anew; a SIGTERM at
  # the recovery's step 4 saves, and the same command resumes the recovery, not the pruning.
  out = str(tmp_path / "w")
  os.makedirs(os.path.join(out, prune_run.PRUNED_DIR))
  pathlib.Path(out, prune_run.PRUNED_DIR, "config.json").write_text("{}")
  iterator = run.loader.feature_train_iterator
  monkeypatch.setattr(run.loader, "feature_train_iterator",
                      lambda *a, **k: ff.SigtermAtBatch(iterator(*a, **k), 4))
  first = prune_run.prune(_recovery_config(finetuned), out)
  assert first.recovery.preempted and first.recovery.step == 4 and "recovery" not in first.info
  assert not os.path.exists(os.path.join(out, prune_run.INFO_FILE))
  counted = []
  monkeypatch.setattr(run.loader, "feature_train_iterator",
                      lambda *a, **k: counted.append(ff.SigtermAtBatch(iterator(*a, **k), None))
                      or counted[-1])
  monkeypatch.setattr(prune_run, "_prune_into", _fail_if_called)
  resumed = prune_run.prune(_recovery_config(finetuned), out)
  straight = recovered[1].info["recovery"]
  assert resumed.recovery.step == 10 and resumed.info["recovery"]["step"] == 10
  assert len(counted[0].lengths) == 6  # steps 5 to 10: resumed from the step-4 checkpoint
  assert resumed.info["recovery"]["dev"] == pytest.approx(straight["dev"], rel=1e-4)
  assert resumed.info["dev"] == pytest.approx(recovered[1].info["dev"])


def test_a_quantization_aware_recovery_scores_the_pruned_model_in_float(finetuned, tmp_path):
  pytest.importorskip("qwix")  # the `quant` extra
  cfg = _recovery_config(finetuned, recovery_epochs=0.2)  # 2 steps
  cfg.quantize.qat = "weight_only"
  out = str(tmp_path / "qat")
  info = prune_run.prune(cfg, out).info
  assert workdir_lib.read_config(prune_run.pruned_dir(out)).quantize.qat == ""
  assert workdir_lib.read_config(out).quantize.qat == "weight_only"
  assert run.evaluate(out, "dev") == pytest.approx(info["recovery"]["dev"])
  cfg.prune.recovery = "distill"  # refused before anything is pruned
  with pytest.raises(config_lib.ConfigError, match=r"quantize.qat='weight_only' is not "
                     r"supported by distillation"):
    prune_run.prune(cfg, str(tmp_path / "distil"))
  assert not os.path.exists(tmp_path / "distil")


def test_cli_recovers_by_distillation_from_the_unpruned_teacher(finetuned, tmp_path):
  source, (train, dev), *_ = finetuned
  out = tmp_path / "distilled"
  proc = subprocess.run(
      [sys.executable, "-m", "jaxfm.prune", f"--config={ROOT}/configs/prune/sst2_minilm.py",
       f"--workdir={out}", f"--config.init_from={source}", f"--config.data.train_file={train}",
       f"--config.data.dev_file={dev}", f"--config.data.max_seq_length={ff.SEQ}",
       "--config.train.batch_size=16", "--config.train.progress_bar=False",
       "--config.prune.batches=2", "--config.prune.recovery_epochs=1",
       "--config.prune.recovery=distill", "--config.optim.peak_learning_rate=2e-3"],
      capture_output=True, text=True, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads(proc.stdout.strip().splitlines()[-1])
  assert info["recovery"]["method"] == "distill" and info["recovery"]["step"] == 10
  assert (out / "DONE").exists()
  saved = workdir_lib.read_config(str(out))
  assert saved.teacher == source and saved.distill.student_init == "init_from"
  assert run.evaluate(str(out), "dev") == pytest.approx(info["recovery"]["dev"])
  assert run.evaluate(prune_run.pruned_dir(str(out)), "dev") == pytest.approx(info["dev"])


def _convert(*args: str) -> subprocess.CompletedProcess:
  """`jaxfm.convert` on one device (as after a run on a slice)."""
  return subprocess.run([sys.executable, "-m", "jaxfm.convert", *args], capture_output=True,
                        text=True, cwd=ROOT, timeout=300, env={**os.environ, "XLA_FLAGS": ""})


def _evaluate_logits(workdir: str, split) -> np.ndarray:
  """[examples, 2]: what `evaluate` and `predict` compute for `workdir` on `split`."""
  job = run.inference(workdir, workdir_lib.load_run(workdir), split)
  with sharding.activation_sharding(job.mesh):
    return loop.predict(job.steps, job.params, job.batches(), job.mesh)["logits"]


def test_lora_adapts_a_pruned_workdir_and_exports_merged_to_transformers(pruned_workdir,
                                                                         finetuned, tmp_path):
  # LoRA over the pruned model as its frozen base: each layer's adapter takes that layer's
  # heads, and the merged export (pruned heads padded, as transformers holds them) computes
  # what `evaluate` computes for the run; the peft export is refused by name.
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out, info = pruned_workdir
  _, (train, dev), split, *_ = finetuned
  cfg = ff.config("classification", out, train, dev, epochs=1.0)
  cfg.peft.method = "lora"
  workdir = str(tmp_path / "lora")
  run.finetune(cfg, workdir)
  adapter = flatten(run.adapted(workdir).trainable["adapter"])
  assert [adapter[f"encoder/layer_{i}/query/lora_b"].shape[1] for i in range(2)] == info["heads"]
  proc = _convert("--to_hf", f"--from={workdir}", f"--out={tmp_path / 'hf'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / "hf")).eval()
  features = split.device_arrays()
  with torch.no_grad():
    theirs = model(**{name: torch.tensor(features[name], dtype=torch.long)
                      for name in ("input_ids", "token_type_ids", "attention_mask")}).logits
  ours = _evaluate_logits(workdir, split)
  np.testing.assert_allclose(theirs.numpy(), ours, atol=1e-5)
  assert np.abs(_evaluate_logits(out, split) - ours).max() > 1e-3  # the adapter trained
  # peft's LoRA tensors would have to match transformers' zero-padded heads: refused by name.
  proc = _convert("--to_peft", f"--from={workdir}", f"--out={tmp_path / 'adapter'}")
  assert proc.returncode == 1 and "adapts a head-pruned model" in proc.stderr
  assert "export the merged model with --to_hf" in proc.stderr


def test_prefix_tuning_a_head_pruned_workdir_is_refused_by_name(pruned_workdir, finetuned,
                                                                tmp_path):
  # A prefix holds keys and values for every head of every layer: refused before any work.
  _, (train, dev), *_ = finetuned
  cfg = ff.config("classification", pruned_workdir[0], train, dev)
  cfg.peft.update(method="prefix", num_virtual_tokens=4)
  cfg.data.max_seq_length = 24
  with pytest.raises(config_lib.ConfigError, match=r"^peft.method='prefix' cannot adapt a "
                     r"head-pruned model \(model.pruned_heads=\[\["):
    run.finetune(cfg, str(tmp_path / "prefix"))
  assert not os.path.exists(tmp_path / "prefix")


def test_an_int8_folder_is_refused_by_name(finetuned, tmp_path):
  pytest.importorskip("qwix")  # the `quant` extra
  from jaxfm.compress import int8_dir  # pylint: disable=import-outside-toplevel  (needs qwix)
  int8_dir.write(finetuned[0], str(tmp_path / "int8"), "weight_only")
  cfg = _prune_config(finetuned)
  cfg.init_from = str(tmp_path / "int8")
  with pytest.raises(config_lib.ConfigError, match=r"^init_from=.* is an int8 folder "
                     r"\(jaxfm.quantize\): prune the fine-tuning workdir it was quantized from"):
    prune_run.prune(cfg, str(tmp_path / "pruned"))
  assert not os.path.exists(tmp_path / "pruned")


def test_cli_bad_share_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "jaxfm.prune", f"--config={ROOT}/configs/prune/sst2_minilm.py",
       f"--workdir={tmp_path / 'w'}", "--config.init_from=x", "--config.data.train_file=t",
       "--config.data.dev_file=d", "--config.prune.ffn_share=1.0"],
      capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == 1
  assert "error: prune.ffn_share=1.0" in proc.stderr


def test_hf_import_reads_transformers_4_pruned_heads(pruned_workdir, tmp_path):
  # transformers 4 saved a pruned model with `pruned_heads` and tensors that lack those heads.
  out, _ = pruned_workdir
  config, params, _, _ = weights.load_jaxfm(out)
  encoder = {"encoder": params["encoder"]}
  padded = tmp_path / "padded"
  interop.export_hf(encoder, config, str(padded))
  hf_config = json.loads((padded / "config.json").read_text())
  tensors = safetensors.numpy.load_file(str(padded / "model.safetensors"))
  for i in range(config.num_layers):
    rows = np.concatenate([np.arange(h * 64, (h + 1) * 64) for h in config.kept_heads(i)])
    prefix = f"bert.encoder.layer.{i}.attention."
    for part in ("query", "key", "value"):
      for kind in ("weight", "bias"):
        tensors[f"{prefix}self.{part}.{kind}"] = tensors[f"{prefix}self.{part}.{kind}"][rows]
    name = f"{prefix}output.dense.weight"
    tensors[name] = np.ascontiguousarray(tensors[name][:, rows])
  hf_config[hf_names.PRUNED_HEADS] = hf_config.pop(hf_names.PADDED_PRUNED_HEADS)
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  (legacy / "config.json").write_text(json.dumps(hf_config))
  safetensors.numpy.save_file(tensors, str(legacy / "model.safetensors"))
  back = interop.import_hf(str(legacy), task="base")
  assert back.config.pruned_heads == config.pruned_heads
  assert back.config.intermediate_size == config.intermediate_size
  for name, value in flatten(back.params).items():
    np.testing.assert_array_equal(value, flatten(encoder)[name])


def test_flops_count_the_pruned_attention_width():
  config = preset("tiny")
  pruned = config.replace(pruned_heads=((1,), ()))  # layer 0: one head of 64 of 128
  a, h, t = 64, 128, 32
  saved = 6 * 2 * h * (h - a) + 6 * 2 * h * (h - a) + 12 * t * (h - a)  # K, V; Q, out; attention
  assert (flops.encoder_flops_per_token(config, t) - flops.encoder_flops_per_token(pruned, t)
          == pytest.approx(saved))
