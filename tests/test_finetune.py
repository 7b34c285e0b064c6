"""Fine-tuning end to end on small learnable data, checked against outside references
(scikit-learn accuracy, seqeval entity F1, exact string match for QA) and the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqeval.metrics
import sklearn.metrics

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import sharding, tasks, weights
from jaxfm import workdir as workdir_lib
from jaxfm.data import loader
from jaxfm.finetuning import run
from jaxfm.models import stack_layers
from jaxfm.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune")
  return root, str(ff.write_model_dir(root))


def _finetune(files, task, writer, name, **train):
  root, model_dir = files
  cfg = ff.config(task, model_dir, *writer(root), **train)
  result, best_step = run.finetune(cfg, str(root / name))
  return str(root / name), result, best_step


@pytest.fixture(scope="module")
def sentiment_run(files):
  return _finetune(files, "classification", ff.write_sentiment, "sst")


def _jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def _cli(*args, **env_overrides: str):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env_overrides}
  out = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


def test_classification_learns_and_scores_like_sklearn(sentiment_run, files):
  workdir, result, best_step = sentiment_run
  assert result.eval["accuracy"] >= 0.9 and best_step is not None
  dev = [line.split("\t") for line in open(files[0] / "dev.tsv").read().splitlines()[1:]]
  rows = run.predict(workdir, _jsonl(files[0] / "dev.jsonl", [{"sentence": s} for s, _ in dev]))
  assert len(rows) == len(dev)
  predicted = [r["label"] for r in rows]
  metrics = run.evaluate(workdir, "dev")
  assert metrics["accuracy"] == pytest.approx(
      sklearn.metrics.accuracy_score([label for _, label in dev], predicted))
  assert metrics["f1"] == pytest.approx(
      sklearn.metrics.f1_score([label for _, label in dev], predicted, pos_label="1"))
  assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_cli_evaluate_and_predict_need_only_the_workdir(sentiment_run, files, tmp_path):
  workdir, _, _ = sentiment_run
  metrics = json.loads(_cli("jaxfm.evaluate", f"--workdir={workdir}", "--split=dev")
                       .strip().splitlines()[-1])
  assert metrics["accuracy"] == pytest.approx(run.evaluate(workdir, "dev")["accuracy"])
  inputs = _jsonl(tmp_path / "new.jsonl", [{"sentence": "the film was great"},
                                           {"sentence": "a very awful plot"}])
  _cli("jaxfm.predict", f"--workdir={workdir}", f"--input={inputs}",
       f"--output={tmp_path / 'preds.jsonl'}")
  rows = [json.loads(line) for line in open(tmp_path / "preds.jsonl")]
  assert [r["label"] for r in rows] == ["1", "0"]


def test_cli_exports_the_best_checkpoint_as_a_transformers_classifier(sentiment_run, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  from jaxfm.models import BertForSequenceClassification  # pylint: disable=import-outside-toplevel
  from jaxfm.train import best  # pylint: disable=import-outside-toplevel
  workdir, _, best_step = sentiment_run
  out = tmp_path / "hf"
  # On one device, as on a laptop after a run on a slice: the 8-device layout is not needed.
  report = _cli("jaxfm.convert", "--to_hf", f"--from={workdir}", f"--out={out}", XLA_FLAGS="")
  assert "exported BertForSequenceClassification" in report
  assert f"params: best checkpoint (step {best_step})" in report
  hf_model = transformers.BertForSequenceClassification.from_pretrained(str(out)).eval()
  assert hf_model.config.id2label == dict(enumerate(workdir_lib.load_run(workdir).label_names))
  config = workdir_lib.read_model_config(workdir)
  step, params, metrics = best.restore_best(workdir)
  params = jax.device_get(params)
  assert step == best_step  # with the whole evaluation that made it the best
  assert metrics == pytest.approx(run.evaluate(workdir, "dev"), rel=1e-5)
  ids = np.random.default_rng(0).integers(1, config.vocab_size, (2, 12)).astype(np.int32)
  ours = BertForSequenceClassification(config, 2).apply({"params": params}, ids,
                                                        np.zeros_like(ids), np.ones_like(ids))
  with torch.no_grad():
    theirs = hf_model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_rerun_after_completion_is_a_no_op(sentiment_run, files):
  root, model_dir = files
  workdir, first, _ = sentiment_run
  cfg = ff.config("classification", model_dir, str(root / "train.tsv"), str(root / "dev.tsv"))
  again, _ = run.finetune(cfg, workdir)
  assert again.step == first.step and again.train == {}


def _train_losses(workdir: str) -> dict[int, float]:
  """Step -> logged training loss (a resumed run logs some steps of its first part too)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["split"] == "train"}


def test_length_buckets_train_like_full_length_batches_and_resume(sentiment_run, files,
                                                                 monkeypatch):
  # Without dropout, cutting a batch's padding changes no number beyond float rounding: the
  # same losses as the full-length run, while the steps compile (and run) shorter shapes; here
  # through a SIGTERM at step 7 and a resume, which restores the cut batches exactly. Each
  # run compiles its first batch's length first, then (ahead, in the background) the others
  # and the eval step's.
  from jaxfm.train import loop
  compiled, eval_compiled = [], []  # per run: the batch lengths compiled, in order
  compile_train_step, compile_eval_step = loop.compile_train_step, loop.compile_eval_step

  def recording(steps, batch, mesh):
    compiled[-1].append(batch["input_ids"].shape[1])
    return compile_train_step(steps, batch, mesh)

  def recording_eval(steps, batch, mesh):
    eval_compiled[-1].append(batch["input_ids"].shape[1])
    return compile_eval_step(steps, batch, mesh)
  monkeypatch.setattr(loop, "compile_train_step", recording)
  monkeypatch.setattr(loop, "compile_eval_step", recording_eval)
  root, model_dir = files
  cfg = ff.config("classification", model_dir, str(root / "train.tsv"), str(root / "dev.tsv"))
  cfg.data.length_buckets = "8,16"
  workdir = str(root / "sst_buckets")
  iterator, iterators = run.loader.feature_train_iterator, []

  def run_until(at: int | None):
    def wrapped(*args, **kwargs):
      iterators.append(ff.SigtermAtBatch(iterator(*args, **kwargs), at))
      return iterators[-1]
    compiled.append([])
    eval_compiled.append([])
    monkeypatch.setattr(run.loader, "feature_train_iterator", wrapped)
    return run.finetune(cfg, workdir)[0]
  first = run_until(7)
  assert first.preempted and first.step == 7
  result = run_until(None)
  for lengths, batches in zip(compiled, iterators):
    assert lengths[0] == batches.lengths[0] and sorted(lengths) == [8, 16, ff.SEQ]
  # Compiles not started by a preemption are dropped; the finished run compiled every eval shape.
  assert set(eval_compiled[0]) <= {8, 16, ff.SEQ} and sorted(eval_compiled[1]) == [8, 16, ff.SEQ]
  assert set(iterators[0].lengths + iterators[1].lengths) - {ff.SEQ}  # cut too
  plain_dir, plain, _ = sentiment_run
  plain_losses, losses = _train_losses(plain_dir), _train_losses(workdir)
  assert result.step == plain.step and set(plain_losses) <= set(losses)
  same = [s for s in sorted(plain_losses) if s != 10]  # step 10's log averages steps 8-10 only
  np.testing.assert_allclose([losses[s] for s in same], [plain_losses[s] for s in same],
                             rtol=1e-4)
  assert result.eval["accuracy"] == plain.eval["accuracy"]


def _with_length_buckets(workdir: str, buckets: str) -> None:
  """Sets `data.length_buckets` in a fine-tuning workdir's saved config."""
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  saved["config"]["data"]["length_buckets"] = buckets
  with open(path, "w") as f:
    json.dump(saved, f)


def test_eval_batches_go_by_length_and_are_cut_alike_on_every_host():
  rng = np.random.default_rng(0)
  n, length, hosts, batch = 19, 16, 2, 4
  tokens = np.where(rng.random(n) < 0.3, rng.integers(9, length + 1, n), rng.integers(2, 5, n))
  mask = (np.arange(length)[None] < tokens[:, None]).astype(np.int32)
  features = {"input_ids": mask * 7, "token_type_ids": np.zeros_like(mask),
              "attention_mask": mask, "labels": np.where(mask > 0, 1, -1)}
  split = tasks.TaskSplit(list(range(n)), features, ("input_ids", "token_type_ids",
                                                      "attention_mask", "labels"))
  per_host = [list(split.eval_batches(batch, host, hosts, (4, 8, length))) for host in range(hosts)]
  seen, lengths = [], set()
  for batches in zip(*per_host):
    assert len({b["input_ids"].shape[1] for b in batches}) == 1  # every host cut alike
    lengths.add(batches[0]["input_ids"].shape[1])
    for b in batches:
      real = b["feature_index"] >= 0
      seen += b["feature_index"][real].tolist()
      np.testing.assert_array_equal(b["attention_mask"][real].sum(axis=1),
                                    tokens[b["feature_index"][real]])  # no real token cut
      kept = b["labels"].shape[1]
      np.testing.assert_array_equal(b["labels"][real],
                                    features["labels"][b["feature_index"][real], :kept])
  assert sorted(seen) == list(range(n)) and len(lengths) >= 2, lengths


def test_ner_entity_f1_equals_seqeval(files, monkeypatch):
  workdir, result, _ = _finetune(files, "ner", ff.write_conll, "ner")
  root = files[0]
  sentences = [[line.split() for line in block.splitlines()]
               for block in open(root / "valid.txt").read().split("\n\n")[1:] if block.strip()]
  rows = run.predict(workdir, _jsonl(root / "valid.jsonl",
                                     [{"tokens": [c[0] for c in s]} for s in sentences]))
  true = [[c[-1] for c in s] for s in sentences]
  predicted = [r["tags"] for r in rows]
  metrics = run.evaluate(workdir, "dev")
  assert metrics["f1"] == pytest.approx(seqeval.metrics.f1_score(true, predicted))
  assert metrics["f1"] > 0.8, metrics
  _with_length_buckets(workdir, "8,16")  # evaluation on cut batches: the same scores
  lengths, cut_to_bucket = [], loader.cut_to_bucket
  monkeypatch.setattr(loader, "cut_to_bucket", lambda *args: lengths.append(
      cut_to_bucket(*args)["input_ids"].shape[1]) or cut_to_bucket(*args))
  assert run.evaluate(workdir, "dev") == pytest.approx(metrics, rel=1e-5)
  assert lengths and max(lengths) < ff.SEQ, lengths
  assert [r["tags"] for r in run.predict(workdir, str(root / "valid.jsonl"))] == predicted


def test_qa_exact_match_counts_exact_answers(files):
  workdir, result, _ = _finetune(files, "qa", ff.write_squad, "qa")
  root = files[0]
  paragraphs = json.load(open(root / "dev.json"))["data"][0]["paragraphs"]
  questions = [{"id": p["qas"][0]["id"], "question": p["qas"][0]["question"],
                "context": p["context"]} for p in paragraphs]
  rows = run.predict(workdir, _jsonl(root / "dev_q.jsonl", questions))
  gold = {p["qas"][0]["id"]: p["qas"][0]["answers"][0]["text"] for p in paragraphs}
  exact = 100 * np.mean([r["answer"] == gold[r["id"]] for r in rows])
  metrics = run.evaluate(workdir, "dev")
  assert metrics["exact_match"] == pytest.approx(exact) and metrics["total"] == len(gold)
  assert all(r["answer"] in q["context"] for r, q in zip(rows, questions))
  _with_length_buckets(workdir, "8,16")  # the span softmax then excludes the cut positions
  cut = run.evaluate(workdir, "dev")
  assert (cut["exact_match"], cut["f1"]) == (metrics["exact_match"], metrics["f1"])


def test_early_stopping_keeps_the_first_of_equal_scores(files, monkeypatch):
  # A learning rate of ~0 keeps the dev accuracy constant: no evaluation improves on the first.
  root, model_dir = files
  cfg = ff.config("classification", model_dir, *ff.write_sentiment(root, 64, 16), epochs=10.0,
                  early_stopping_patience=2)
  cfg.optim.peak_learning_rate = 1e-12
  monkeypatch.chdir(root)  # a relative workdir, as users type it
  result, best_step = run.finetune(cfg, "stop")
  per_epoch = 4  # 64 examples / batch 16
  assert result.stopped_early and best_step == per_epoch
  assert result.step == 3 * per_epoch  # two evaluations without improvement after the best
  again, _ = run.finetune(cfg, "stop")
  assert again.step == result.step


def test_unknown_dev_label_names_file_and_line(files, tmp_path):
  root, model_dir = files
  train, _ = ff.write_sentiment(root)
  dev = tmp_path / "dev.tsv"
  dev.write_text("sentence\tlabel\na good film\t1\na bad film\tmaybe\n")
  with pytest.raises(ValueError, match=rf"{dev}:3: unknown label 'maybe'"):
    run.finetune(ff.config("classification", model_dir, train, str(dev)), str(tmp_path / "w"))


def test_init_report_drops_mlm_head_and_initialises_new_heads(files):
  root, model_dir = files
  cfg = ff.config("classification", model_dir, *ff.write_sentiment(root))
  source_config, pretrained, _, _ = weights.read_pretrained(model_dir, "auto")
  task = tasks.make_task("classification", source_config, ["0", "1"], None, cfg.data)
  fresh = jax.device_get(sharding.unbox(task.init_params(jax.random.key(0))))
  merged = weights.merge_pretrained(fresh, pretrained, model_dir)
  assert {n.split("/")[0] for n in merged.dropped} == {"mlm_head"}
  assert sorted({"/".join(n.split("/")[:2]) for n in merged.initialised}) == [
      "classifier/bias", "classifier/kernel", "encoder/pooler"]
  np.testing.assert_array_equal(
      merged.params["encoder"]["embeddings"]["word_embeddings"]["embedding"],
      pretrained["encoder"]["embeddings"]["word_embeddings"]["embedding"])


def test_layer_decay_follows_depth_in_both_layouts():
  leaf = jnp.ones((3, 2))
  params = {"encoder": {"embeddings": {"w": leaf}, "layer_0": {"w": leaf}, "layer_1": {"w": leaf},
                        "pooler": {"w": leaf}}, "classifier": {"w": leaf}}
  plain = optim.layer_lr_scales(params, 0.5)
  assert plain["encoder"]["embeddings"]["w"] == 0.125
  assert (plain["encoder"]["layer_0"]["w"], plain["encoder"]["layer_1"]["w"]) == (0.25, 0.5)
  assert plain["encoder"]["pooler"]["w"] == 1.0 and plain["classifier"]["w"] == 1.0
  params["encoder"]["layer_2"] = {"w": leaf}
  scanned = optim.layer_lr_scales(stack_layers(params), 0.5)["encoder"]  # layers 0-1 + layer_2
  np.testing.assert_allclose(np.asarray(scanned["layers"]["w"])[:, 0, 0], [0.125, 0.25])
  assert scanned["layer_2"]["w"] == 0.5 and scanned["embeddings"]["w"] == 0.0625


@pytest.mark.parametrize("field,value,message", [
    ("task", "parsing", "must be one of"),
    ("data.train_file", "", "data.train_file is required"),
    ("data.text_fields", "a,b,c", "one field or two"),
    ("data.max_seq_length", 4, "must be >= 8"),
    ("train.epochs", -1.0, "must be >= 0"),
    ("optim.layer_decay", 0.0, "must be in (0, 1]"),
    ("optim.warmup_ratio", 1.0, "must be < 1"),
    ("train.best_mode", "up", "must be one of"),
    ("data.on_error", "ignore", "must be one of"),
    ("data.length_buckets", "32,short", "must list positive integers"),
    ("data.length_buckets", "0,32", "must list positive integers"),
    ("data.max_buckets", 0, "must be > 0"),
    ("data.bucket_multiple", 0, "must be > 0"),
])
def test_finetune_config_rules(field, value, message):
  cfg = config_lib.finetune_defaults()
  cfg.data.train_file = "train.tsv"
  node = cfg
  *parents, leaf = field.split(".")
  for part in parents:
    node = node[part]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    tasks.validate_finetune(cfg)


def test_length_buckets_are_sorted_and_end_with_max_seq_length():
  data = config_lib.finetune_defaults().data
  data.length_buckets = ""
  assert config_lib.length_buckets(data) == (128,)
  data.length_buckets = " 64, 32,64 "
  assert config_lib.length_buckets(data) == (32, 64, 128)
  data.length_buckets = "64,128,256"
  assert config_lib.length_buckets(data) == (64, 128)


def test_cli_rejects_a_mesh_that_does_not_fit_before_any_work(files, tmp_path):
  train, dev = ff.write_sentiment(files[0])
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run(
      [sys.executable, "-m", "jaxfm.finetune", "--config=configs/finetune/sst2.py",
       f"--workdir={tmp_path / 'w'}", f"--config.data.train_file={train}",
       f"--config.init_from={files[1]}", "--config.mesh.data=3"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert "mesh.data=3, mesh.fsdp=1, mesh.tensor=1 does not match the 8 devices" in out.stderr
  assert not (tmp_path / "w").exists()
