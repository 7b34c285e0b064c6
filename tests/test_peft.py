"""Parameter-efficient fine-tuning (jaxfm.peft): only the adapter and the new head train, the
checkpoint holds only them and names its base by content hash, and the adapter exported in
huggingface/peft's format gives jaxfm's logits in PyTorch (peft and transformers as references).
"""

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxfm import config as config_lib
from jaxfm import interop, peft, sharding
from jaxfm import workdir as workdir_lib
from jaxfm.finetuning import run
from jaxfm.models import BertForSequenceClassification, BertForTokenClassification
from jaxfm.tasks import make_task
from jaxfm.train import loop
from jaxfm.trees import flatten
from tests import finetune_fixtures as ff

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The fixture data and a tiny MLM 'pretrained' model as a Hugging Face folder."""
  root = tmp_path_factory.mktemp("peft")
  config, params, tokenizer = interop.load_model_dir(str(ff.write_model_dir(root)))[:3]
  interop.export_hf(params, config, str(root / "hf_base"), tokenizer)
  return root


def _config(files, task, writer, method, epochs=6.0, **peft_fields):
  cfg = ff.config(task, f"hf:{files / 'hf_base'}", *writer(files), epochs=epochs)
  cfg.optim.peak_learning_rate = 1e-2
  cfg.peft.method = method
  cfg.peft.update(peft_fields)
  return cfg


def _finetune(files, name, *args, **fields):
  result, _ = run.finetune(_config(files, *args, **fields), str(files / name))
  return str(files / name), result


@pytest.fixture(scope="module")
def lora_run(files):
  # A random 'pretrained' base: the adapter needs more steps than full fine-tuning.
  return _finetune(files, "lora", "classification", ff.write_sentiment, "lora", epochs=20.0,
                   rank=4, alpha=8.0, target_modules="query,value,output")


@pytest.fixture(scope="module")
def lora_dropout_run(files):
  # Dropout on the LoRA input trains beside the projections; export folds as without it.
  return _finetune(files, "lora_dropout", "classification", ff.write_sentiment, "lora",
                   rank=4, alpha=8.0, dropout=0.1,
                   target_modules="key,attention.output,intermediate")


@pytest.fixture(scope="module")
def ia3_run(files):
  return _finetune(files, "ia3", "classification", ff.write_sentiment, "ia3")


@pytest.fixture(scope="module")
def ner_run(files):
  return _finetune(files, "ner_lora", "ner", ff.write_conll, "lora", rank=8, alpha=8.0,
                   rslora=True, target_modules="all-linear")


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def _inputs(vocab_size, rows=3, length=12):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab_size, (rows, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  return ids, np.zeros_like(ids), mask


def _jaxfm_logits(workdir, inputs):
  parts = run.adapted(workdir)
  config = workdir_lib.read_model_config(workdir)
  labels = len(parts.run.label_names)
  model = (BertForSequenceClassification(config, labels) if parts.run.cfg.task == "classification"
           else BertForTokenClassification(config, labels))
  return np.asarray(model.apply({"params": parts.merged()}, *inputs))


def _torch_logits(model, inputs):
  torch = pytest.importorskip("torch")
  ids, types, mask = (torch.tensor(x, dtype=torch.long) for x in inputs)
  with torch.no_grad():
    return model(input_ids=ids, token_type_ids=types, attention_mask=mask).logits.numpy()


def _peft_model(workdir, out):
  peft_lib = pytest.importorskip("peft")
  transformers = pytest.importorskip("transformers")
  done = _cli("jaxfm.convert", "--to_peft", f"--from={workdir}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "adapter" in done.stdout
  cfg = workdir_lib.read_config(workdir)
  architecture = (transformers.BertForSequenceClassification if cfg.task == "classification"
                  else transformers.BertForTokenClassification)
  labels = len(workdir_lib.label_names(workdir))
  base = architecture.from_pretrained(cfg.init_from.removeprefix("hf:"), num_labels=labels)
  return peft_lib.PeftModel.from_pretrained(base, str(out)).eval()


def test_only_the_adapter_and_the_head_train_and_are_saved(lora_run, files):
  workdir, result = lora_run
  assert result.eval["accuracy"] >= 0.9
  cfg = workdir_lib.read_config(workdir)
  params = run.adapted(workdir).trainable
  assert set(params) == {"adapter", "head"}
  adapter = flatten(params["adapter"])
  # query, value and output of both layers, each an A and a B.
  assert len(adapter) == 2 * 3 * 2 and all(k.endswith(("lora_a", "lora_b")) for k in adapter)
  assert adapter["encoder/layer_0/query/lora_a"].shape == (128, 4)
  assert adapter["encoder/layer_0/query/lora_b"].shape == (4, 2, 64)
  assert adapter["encoder/layer_1/output/lora_a"].shape == (512, 4)
  assert sorted(flatten(params["head"])) == ["classifier/bias", "classifier/kernel",
                                             "encoder/pooler/bias", "encoder/pooler/kernel"]
  assert len(cfg.peft.base_sha256) == 64
  # Every checkpoint's state holds the trainable tree only: no base parameter.
  for step in (pathlib.Path(workdir) / "checkpoints").iterdir():
    saved = (step / "state" / "_METADATA").read_text()
    assert "lora_a" in saved and "classifier" in saved
    assert "word_embeddings" not in saved and "qkv_kernel" not in saved


def test_an_adapter_over_a_fine_tuned_head_exports_merged_not_as_peft(files, tmp_path):
  # The head came frozen with a fine-tuned init_from: peft's format has nowhere to put it.
  full = str(tmp_path / "full")
  run.finetune(ff.config("classification", f"hf:{files / 'hf_base'}",
                         *ff.write_sentiment(files), epochs=1.0), full)
  cfg = _config(files, "classification", ff.write_sentiment, "lora", epochs=1.0)
  cfg.init_from = full
  run.finetune(cfg, str(tmp_path / "lora"))
  done = _cli("jaxfm.convert", "--to_peft", f"--from={tmp_path / 'lora'}",
              f"--out={tmp_path / 'adapter'}")
  assert done.returncode == 1 and "the run trained no task head" in done.stderr
  assert "export the run merged with --to_hf" in done.stderr


def test_evaluate_and_predict_rebuild_base_and_adapter(lora_run, files):
  workdir, result = lora_run
  metrics = run.evaluate(workdir, "dev")
  assert metrics["accuracy"] == pytest.approx(result.eval["accuracy"])


def test_a_changed_base_is_refused_by_name(files):
  base = files / "hf_changed"
  shutil.copytree(files / "hf_base", base)
  cfg = _config(files, "classification", ff.write_sentiment, "lora")
  cfg.init_from = f"hf:{base}"
  cfg.train.epochs = 1.0
  workdir = str(files / "changed")
  run.finetune(cfg, workdir)
  weights_file = base / "model.safetensors"
  tensors = safetensors.numpy.load_file(str(weights_file))
  name = "bert.encoder.layer.0.attention.self.value.weight"
  tensors[name] = tensors[name] + 1e-3
  safetensors.numpy.save_file(tensors, str(weights_file))
  with pytest.raises(config_lib.ConfigError, match=rf"init_from=hf:{base} changed: .*sha256"):
    run.evaluate(workdir, "dev")


@pytest.mark.parametrize("which", ["lora_run", "lora_dropout_run", "ia3_run", "ner_run"])
def test_peft_format_gives_jaxfm_logits_in_pytorch(which, files, request, tmp_path):
  workdir, _ = request.getfixturevalue(which)
  model = _peft_model(workdir, tmp_path / "adapter")
  inputs = _inputs(workdir_lib.read_model_config(workdir).vocab_size)
  ours = _jaxfm_logits(workdir, inputs)
  np.testing.assert_allclose(_torch_logits(model, inputs), ours, atol=1e-4)
  # The adapter moved the model away from its base.
  trained = flatten(run.adapted(workdir).trainable["adapter"])
  assert any(np.abs(np.asarray(v) - (1.0 if k.endswith("scale") else 0.0)).max() > 1e-3
             for k, v in trained.items() if not k.endswith("lora_a"))


def test_modules_to_save_trains_the_base_pooler_and_peft_loads_it(files, tmp_path):
  # A base with a pooler of its own and no MLM head (as all-MiniLM-L6-v2): frozen unless named.
  base = tmp_path / "hf_pooled"
  shutil.copytree(files / "hf_base", base)
  tensors = {k: v for k, v in safetensors.numpy.load_file(str(base / "model.safetensors")).items()
             if not k.startswith("cls.")}
  hidden = json.loads((base / "config.json").read_text())["hidden_size"]
  rng = np.random.default_rng(0)
  tensors["bert.pooler.dense.weight"] = rng.normal(0, 0.05, (hidden, hidden)).astype(np.float32)
  tensors["bert.pooler.dense.bias"] = np.zeros(hidden, np.float32)
  safetensors.numpy.save_file(tensors, str(base / "model.safetensors"))
  heads = {}
  for saved in ("", "pooler"):
    cfg = _config(files, "classification", ff.write_sentiment, "lora", epochs=2.0,
                  modules_to_save=saved)
    cfg.init_from = f"hf:{base}"
    workdir = str(tmp_path / f"lora_{saved}")
    result, _ = run.finetune(cfg, workdir)
    parts = run.adapted(workdir)  # the base's hash checked again without the pooler
    heads[saved] = flatten(parts.trainable["head"])
    assert ("encoder/pooler/kernel" in flatten(parts.frozen)) == (not saved)
  assert sorted(heads[""]) == ["classifier/bias", "classifier/kernel"]
  assert sorted(heads["pooler"]) == sorted(heads[""]) + ["encoder/pooler/bias",
                                                         "encoder/pooler/kernel"]
  assert np.abs(heads["pooler"]["encoder/pooler/kernel"]
                - tensors["bert.pooler.dense.weight"].T).max() > 1e-3  # it trained
  assert run.evaluate(workdir, "dev")["accuracy"] == pytest.approx(result.eval["accuracy"])
  # peft puts the trained pooler over the base's, and jaxfm imports it back the same way.
  model = _peft_model(workdir, tmp_path / "adapter")
  inputs = _inputs(workdir_lib.read_model_config(workdir).vocab_size)
  np.testing.assert_allclose(_torch_logits(model, inputs), _jaxfm_logits(workdir, inputs),
                             atol=1e-4)
  done = _cli("jaxfm.convert", f"--from_peft={tmp_path / 'adapter'}", f"--base={base}",
              f"--out={tmp_path / 'imported'}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert workdir_lib.read_config(str(tmp_path / "imported")).peft.modules_to_save == "pooler"
  np.testing.assert_allclose(_jaxfm_logits(str(tmp_path / "imported"), inputs),
                             _jaxfm_logits(workdir, inputs), atol=1e-5)


@pytest.mark.parametrize("which", ["lora_run", "lora_dropout_run", "ia3_run"])
def test_merged_export_equals_base_plus_adapter(which, files, request, tmp_path):
  transformers = pytest.importorskip("transformers")
  workdir, _ = request.getfixturevalue(which)
  done = _cli("jaxfm.convert", "--to_hf", f"--from={workdir}", f"--out={tmp_path / 'merged'}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "merged" in done.stdout
  merged = transformers.BertForSequenceClassification.from_pretrained(
      str(tmp_path / "merged")).eval()
  unmerged = _peft_model(workdir, tmp_path / "adapter")
  inputs = _inputs(merged.config.vocab_size)
  np.testing.assert_allclose(_torch_logits(merged, inputs), _torch_logits(unmerged, inputs),
                             atol=1e-5)


def classifier_steps(cfg) -> tuple[loop.Steps, loop.Task, jax.sharding.Mesh]:
  """The steps (and their shardings) of a binary classifier whose base is every encoder param
  but the pooler, under `cfg`'s PEFT method on `cfg`'s mesh; the task and the mesh."""
  task = make_task("classification", config_lib.bert_config(cfg, "cpu"), ["0", "1"], None,
                   cfg.data)
  plan = peft.Plan(peft.Settings.of(cfg.peft), frozenset(
      n for n in flatten(sharding.unbox(jax.eval_shape(task.init_params, jax.random.key(0))))
      if not n.startswith(("classifier", "encoder/pooler"))))
  mesh = loop.make_mesh(cfg)
  return loop.build_steps(cfg, task, mesh, plan), task, mesh


def test_lora_shards_like_the_kernel_it_adapts(files):
  """On 8 devices as data 2 x fsdp 2 x tensor 2, A takes the kernel's input axes and B its
  output axes; the frozen base is a sharded argument of the step, not a constant."""
  cfg = _config(files, "classification", ff.write_sentiment, "lora", target_modules="all-linear")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.model.scan_layers = True
  steps, task, mesh = classifier_steps(cfg)
  specs = {k: tuple(v.spec) for k, v in flatten(steps.state_shardings.params["adapter"]).items()}
  # A on the kernel's input axes, B on its output axes, the rank axis replicated.
  assert specs["encoder/layers/query/lora_a"] == (None, "fsdp", None)  # [layers, hidden, r]
  assert specs["encoder/layers/query/lora_b"] == (None, None, "tensor", None)  # [.., r, heads, kv]
  assert specs["encoder/layer_1/attention.output/lora_a"] == ("tensor", None, None)
  assert specs["encoder/layer_1/attention.output/lora_b"] == (None, "fsdp")
  assert specs["encoder/layer_1/intermediate/lora_b"] == (None, "tensor")
  assert specs["encoder/layer_1/output/lora_a"] == ("tensor", None)
  frozen = {k: tuple(v.spec) for k, v in flatten(steps.frozen_shardings).items()}
  assert frozen["encoder/layers/attention/qkv_kernel"] == (None, "fsdp", None, "tensor", None)
  assert "classifier/kernel" not in frozen and "classifier/kernel" in flatten(
      steps.state_shardings.params["head"])
  batch = steps.abstract_batch(task, cfg.train.batch_size)
  compiled, _ = loop.compile_train_step(steps, batch, mesh)
  # The base is the step's third argument, and no array constant is compiled into it.
  lowered = steps.train_step.lower(steps.abstract_state, batch, *steps.frozen_args())
  assert jax.tree.structure(lowered.args_info[0][2]) == jax.tree.structure(steps.frozen)
  constants = re.findall(r"\[([\d,]*)\]\{[^}]*\} constant\(", compiled.as_text())
  assert max((math.prod(int(d) for d in c.split(",") if d) for c in constants), default=1) < 1024
  # Its optimizer state exists only for the trainable tree.
  opt_leaves = sum(x.size for x in jax.tree.leaves(steps.abstract_state.opt_state))
  trainable = sum(x.size for x in jax.tree.leaves(steps.abstract_state.params))
  assert opt_leaves <= 2 * trainable + 8
