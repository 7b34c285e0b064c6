"""Fine-tuned Hugging Face BERT task models imported as jaxfm workdirs (`convert --from_hf
--task=classification|ner|qa`): transformers' logits from the workdir, a distillation teacher,
evaluate, and --to_hf writing the same tensors back; mismatched folders refused by name."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy

from jaxfm import config as config_lib
from jaxfm import weights
from jaxfm import workdir as workdir_lib
from jaxfm.distillation.teacher import load_teacher
from jaxfm.finetuning import run
from jaxfm.interop import InteropError, export_hf
from jaxfm.interop.hf_task_import import import_workdir
from jaxfm.tasks import make_task
from tests import finetune_fixtures as ff

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SENTIMENTS = ["negative", "neutral", "positive"]
TAGS = ["O", "B-PER", "B-LOC", "I-LOC"]  # those of `ff.write_conll`


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """A folder holding the fixtures' vocab.txt."""
  root = tmp_path_factory.mktemp("hf_task")
  ff.write_model_dir(root)
  return root


def _hf_folder(root, name, architecture, labels=None, **config_fields):
  """A tiny randomly initialised transformers `architecture` (every param randomised, biases
  too) saved with the fixtures' vocab.txt; returns (folder, model in eval mode)."""
  vocab = (root / "vocab.txt").read_text().splitlines()
  fields = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=64, max_position_embeddings=ff.SEQ)
  if labels:
    fields.update(id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
  config = transformers.BertConfig(**fields, **config_fields)
  torch.manual_seed(0)
  model = getattr(transformers, architecture)(config)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn(param.shape, generator=generator) * 0.05)
  out = root / name
  model.save_pretrained(str(out))
  shutil.copy(root / "vocab.txt", out / "vocab.txt")
  return out, model.eval()


def _inputs(vocab_size, rows=3, length=12):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab_size, (rows, length)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  return ids, rng.integers(0, 2, ids.shape).astype(np.int32), mask


def _torch_outputs(model, inputs):
  ids, types, mask = (torch.tensor(x, dtype=torch.long) for x in inputs)
  with torch.no_grad():
    out = model(input_ids=ids, token_type_ids=types, attention_mask=mask)
  if hasattr(out, "start_logits"):
    return out.start_logits.numpy(), out.end_logits.numpy()
  return out.logits.numpy()


def _jaxfm_outputs(workdir, inputs):
  """The workdir's task model applied to its best checkpoint's params."""
  saved = workdir_lib.load_run(workdir)
  task = make_task(saved.cfg.task, config_lib.bert_config(saved.cfg, "cpu"), saved.label_names,
                   None, saved.cfg.data)
  params = weights.workdir_params(workdir).params
  return task.model.apply({"params": params}, *inputs)


def _assert_same(ours, theirs):
  """Logits, or QA's (start, end), equal within float32 rounding."""
  ours, theirs = (x if isinstance(x, tuple) else (x,) for x in (ours, theirs))
  assert len(ours) == len(theirs)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(np.asarray(a), b, atol=1e-5)


@pytest.fixture(scope="module")
def classifier(root):
  """A 3-label sequence classifier imported by the CLI."""
  folder, model = _hf_folder(root, "hf_cls", "BertForSequenceClassification", SENTIMENTS)
  workdir = root / "cls_workdir"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run([sys.executable, "-m", "jaxfm.convert", f"--from_hf={folder}",
                         f"--out={workdir}", "--task=classification"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "as jaxfm BertForSequenceClassification" in done.stdout
  return folder, model, str(workdir)


def test_imported_classifier_gives_transformers_logits(classifier):
  folder, model, workdir = classifier
  cfg = workdir_lib.read_config(workdir)
  assert cfg.task == "classification" and cfg.init_from == f"hf:{folder}"
  assert cfg.data.max_seq_length == ff.SEQ  # capped to max_position_embeddings
  assert workdir_lib.label_names(workdir) == SENTIMENTS
  inputs = _inputs(cfg.model.vocab_size)
  _assert_same(_jaxfm_outputs(workdir, inputs), _torch_outputs(model, inputs))


@pytest.mark.parametrize("architecture,task,labels", [
    ("BertForTokenClassification", "ner", TAGS),
    ("BertForQuestionAnswering", "qa", None),
])
def test_imported_token_and_span_models_give_transformers_logits(root, architecture, task,
                                                                  labels):
  folder, model = _hf_folder(root, f"hf_{task}", architecture, labels)
  workdir = str(root / f"{task}_workdir")
  report = import_workdir(str(folder), workdir, task)
  assert f"as jaxfm {architecture}" in report
  assert workdir_lib.read_config(workdir).task == task
  assert workdir_lib.label_names(workdir) == labels
  inputs = _inputs(len((root / "vocab.txt").read_text().splitlines()))
  _assert_same(_jaxfm_outputs(workdir, inputs), _torch_outputs(model, inputs))
  if task == "ner":  # a workdir evaluate scores
    _, dev = ff.write_conll(root)
    metrics = run.evaluate(workdir, "dev", dev)
    assert np.isfinite(metrics["loss"]) and 0.0 <= metrics["f1"] <= 1.0


def test_a_one_output_classifier_imports_as_regression(root):
  folder, model = _hf_folder(root, "hf_reg", "BertForSequenceClassification", num_labels=1)
  workdir = str(root / "reg_workdir")
  import_workdir(str(folder), workdir, "classification")
  assert workdir_lib.read_config(workdir).task == "regression"
  assert workdir_lib.label_names(workdir) is None
  inputs = _inputs(len((root / "vocab.txt").read_text().splitlines()))
  _assert_same(_jaxfm_outputs(workdir, inputs), _torch_outputs(model, inputs))


def test_to_hf_writes_the_imported_tensors_back(classifier, tmp_path):
  folder, _, workdir = classifier
  source = weights.load_jaxfm(workdir)
  export_hf(source.params, source.config, str(tmp_path / "back"), source.tokenizer_dir,
            workdir_lib.label_names(workdir))
  original = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  back = safetensors.numpy.load_file(str(tmp_path / "back" / "model.safetensors"))
  assert sorted(back) == sorted(original)
  for name, value in original.items():
    np.testing.assert_allclose(back[name], value, atol=1e-7, err_msg=name)
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  assert config["architectures"] == ["BertForSequenceClassification"]
  assert list(config["id2label"].values()) == SENTIMENTS


def test_the_imported_classifier_is_a_distillation_teacher(classifier):
  _, model, workdir = classifier
  cfg = config_lib.distill_defaults()
  cfg.task, cfg.teacher = "classification", workdir
  teacher = load_teacher(cfg)
  assert teacher.label_names == SENTIMENTS and len(teacher.sha256) == 64
  inputs = _inputs(teacher.config.vocab_size)
  logits = make_task("classification", teacher.config, teacher.label_names, None,
                     cfg.data).model.apply({"params": teacher.params}, *inputs)
  _assert_same(logits, _torch_outputs(model, inputs))


def test_a_hugging_face_teacher_is_pointed_at_the_import():
  cfg = config_lib.distill_defaults()
  cfg.task, cfg.teacher = "regression", "hf:some/folder"
  with pytest.raises(config_lib.ConfigError, match=r"jaxfm.convert --from_hf=some/folder "
                     r"--out=WORKDIR --task=classification"):
    load_teacher(cfg)


def test_wrong_task_names_the_architecture_found(classifier, tmp_path):
  folder = classifier[0]
  with pytest.raises(InteropError, match=r"--task=ner imports BertForTokenClassification, but "
                     r"the checkpoint's architectures are \['BertForSequenceClassification'\]"):
    import_workdir(str(folder), str(tmp_path / "out"), "ner")
  assert not (tmp_path / "out").exists()


def test_labels_that_do_not_fit_the_classifier_are_refused(classifier, tmp_path):
  folder = tmp_path / "two_labels"
  shutil.copytree(classifier[0], folder)
  config = json.loads((folder / "config.json").read_text())
  config["id2label"] = {"0": "negative", "1": "positive"}
  (folder / "config.json").write_text(json.dumps(config))
  with pytest.raises(InteropError, match=r"id2label names 2 labels .* but the classifier has 3 "
                     r"outputs"):
    import_workdir(str(folder), str(tmp_path / "out"), "classification")


def test_a_non_empty_out_and_a_folder_without_tokenizer_are_refused(classifier, tmp_path):
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("x")
  with pytest.raises(InteropError, match=r"--out=.*out is not empty"):
    import_workdir(str(classifier[0]), str(tmp_path / "out"), "classification")
  folder = tmp_path / "no_vocab"
  shutil.copytree(classifier[0], folder)
  (folder / "vocab.txt").unlink()
  with pytest.raises(InteropError, match=r"no tokenizer files"):
    import_workdir(str(folder), str(tmp_path / "empty"), "classification")


def test_a_tensor_the_task_model_lacks_is_refused_by_name(classifier, tmp_path):
  folder = tmp_path / "extra"
  shutil.copytree(classifier[0], folder)
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  tensors["dropout_probe.weight"] = np.zeros((2, 2), np.float32)
  safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
  with pytest.raises(InteropError, match=r"unexpected tensor\(s\) dropout_probe.weight"):
    import_workdir(str(folder), str(tmp_path / "out"), "classification")


def test_a_token_classifiers_stray_pooler_is_ignored_by_name(root, tmp_path):
  folder, model = _hf_folder(root, "hf_ner_pooler", "BertForTokenClassification", TAGS)
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  tensors["bert.pooler.dense.weight"] = np.ones((32, 32), np.float32)
  tensors["bert.pooler.dense.bias"] = np.ones(32, np.float32)
  safetensors.numpy.save_file(tensors, str(folder / "model.safetensors"))
  report = import_workdir(str(folder), str(tmp_path / "out"), "ner")
  assert ("ignored bert.pooler.dense.weight: pooler, not part of BertForTokenClassification "
          "(task 'ner')") in report
  inputs = _inputs(len((root / "vocab.txt").read_text().splitlines()))
  _assert_same(_jaxfm_outputs(str(tmp_path / "out"), inputs), _torch_outputs(model, inputs))


def test_a_multi_output_regression_head_is_refused(root, tmp_path):
  folder, _ = _hf_folder(root, "hf_reg3", "BertForSequenceClassification", SENTIMENTS,
                         problem_type="regression")
  with pytest.raises(InteropError, match=r"a regression head with 3 outputs"):
    import_workdir(str(folder), str(tmp_path / "out"), "classification")
