"""Packing for fine-tuning (`data.packing`): packed rows give each example the outputs, losses,
gradients and scores of the same example alone in its row, and no example sees another."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import sharding, tasks
from jaxfm.data import loader
from jaxfm.data.packing import Packing
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.finetuning import run
from jaxfm.models import preset
from jaxfm.train import evaluation, loop

SLOTS = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("packing")
  model_dir = ff.write_model_dir(root)
  train, dev = ff.write_sentiment(root)
  conll_train, conll_dev = ff.write_conll(root)
  pairs = root / "pairs.tsv"  # the sentiment rows split into two texts
  lines = (root / "train.tsv").read_text().splitlines()[1:]
  pairs.write_text("a\tb\tlabel\n" + "".join(
      f"{' '.join(s.split()[:2])}\t{' '.join(s.split()[2:]) or 'the'}\t{y}\n"
      for s, y in (line.split("\t") for line in lines)))
  return dict(root=root, model_dir=str(model_dir), vocab=str(root / "vocab.txt"),
              classification=(train, dev), pairs=(str(pairs), str(pairs)),
              ner=(conll_train, conll_dev))


def _config(files, case: str, packing: bool, **model):
  kind = "ner" if case == "ner" else "classification"
  cfg = ff.config(kind, files["model_dir"], *files[case])
  cfg.data.tokenizer = files["vocab"]
  cfg.data.packing = packing
  cfg.data.max_examples_per_row = SLOTS
  cfg.data.length_buckets = ""
  if case == "pairs":
    cfg.data.text_fields = "a,b"
  cfg.model.update(model)
  return cfg


def _splits(cfg, split: str = "train") -> tuple[tasks.TaskSplit, list[str]]:
  tokenizer = load_tokenizer(cfg.data.tokenizer).backend
  train, labels = tasks.load_split(cfg.task, cfg.data, cfg.data.train_file, tokenizer, None)
  if split == "train":
    return train, labels
  return tasks.load_split(cfg.task, cfg.data, cfg.data.dev_file, tokenizer, labels)[0], labels


def _task(cfg, labels, split, **model):
  tokens = len(open(cfg.data.tokenizer).read().split())
  config = preset("tiny", vocab_size=tokens, max_position_embeddings=ff.SEQ, hidden_dropout=0.0,
                  attention_dropout=0.0, **model)
  return tasks.make_task(cfg.task, config, labels, split, cfg.data)


def _outputs(task, params, split) -> dict[str, np.ndarray]:
  """The predict outputs of every feature of `split`, in feature order, on one device."""
  predict = jax.jit(task.predict_fn)
  return evaluation.gather_outputs([predict(params, batch)
                                    for batch in split.eval_batches(16, 0, 1)])


# ---------------------------------------------------------------- the plan and the rows

def test_plan_puts_every_feature_in_one_row_within_its_limits_deterministically():
  lengths = np.random.default_rng(0).integers(3, 40, 500)
  packing = Packing(row_length=48, max_per_row=5)
  slots = packing.plan(lengths)  # [rows, 5]
  members = slots[slots >= 0]
  assert sorted(members) == list(range(500))
  assert ((slots >= 0).sum(axis=1) <= 5).all()
  used = np.where(slots >= 0, lengths[np.maximum(slots, 0)], 0).sum(axis=1)
  assert (used <= 48).all()
  assert lengths.sum() / (48 * len(slots)) > 0.95  # best-fit decreasing leaves little room
  np.testing.assert_array_equal(packing.plan(lengths), slots)
  with pytest.raises(ValueError, match="49 tokens does not fit in rows of 48"):
    packing.plan(np.array([3, 49]))


def test_pack_lays_each_feature_out_whole_with_its_own_positions_and_segment():
  rng = np.random.default_rng(1)
  lengths = rng.integers(2, 12, 40)
  mask = (np.arange(12) < lengths[:, None]).astype(np.int32)  # [40, 12]
  features = {"input_ids": np.where(mask, rng.integers(5, 99, (40, 12)), 0).astype(np.int32),
              "attention_mask": mask, "labels": rng.integers(0, 3, 40).astype(np.int32),
              "feature_index": np.arange(40, dtype=np.int32)}
  packed = Packing(24, 4).pack(features, {"feature_index": -1})
  seen = []
  for row, slot in zip(*np.nonzero(packed["cls_positions"] >= 0)):
    i, start = packed["feature_index"][row, slot], packed["cls_positions"][row, slot]
    span = slice(start, start + lengths[i])
    np.testing.assert_array_equal(packed["input_ids"][row, span],
                                  features["input_ids"][i, :lengths[i]])
    np.testing.assert_array_equal(packed["position_ids"][row, span], np.arange(lengths[i]))
    assert (packed["segment_ids"][row, span] == slot + 1).all()
    assert packed["labels"][row, slot] == features["labels"][i]
    seen.append(i)
  assert sorted(seen) == list(range(40))
  assert (packed["feature_index"][packed["cls_positions"] < 0] == -1).all()
  assert packed["attention_mask"].sum() == lengths.sum() == (packed["segment_ids"] > 0).sum()
  with pytest.raises(ValueError, match="attention_mask a prefix"):
    Packing(24, 4).pack({**features, "attention_mask": mask[:, ::-1].copy()})


# ---------------------------------------------------------------- the model on packed rows

@pytest.mark.parametrize("case,model", [
    ("classification", {}), ("pairs", {}), ("ner", {}),
    ("classification", dict(cpu_paths=True, scan_layers=True, remat_policy="full")),
    ("ner", dict(cpu_paths=True)),
])
def test_packed_rows_give_each_example_its_own_outputs(files, case, model):
  # The same examples alone in their rows and packed several to a row: equal logits, and
  # changing one example's tokens changes no other example's outputs.
  cfg = _config(files, case, packing=False)
  plain, labels = _splits(cfg)
  packed, _ = _splits(_config(files, case, packing=True))
  assert len(packed) < len(plain) / 2  # rows, not features
  task = _task(cfg, labels, None, **model)
  params = sharding.unbox(task.init_params(jax.random.key(0)))
  expected, got = _outputs(task, params, plain), _outputs(
      _task(_config(files, case, packing=True), labels, None, **model), params, packed)
  np.testing.assert_array_equal(got["feature_index"], np.arange(len(plain.features["labels"])))
  if case == "ner":  # [features, length, labels]: the positions inside each example are its own
    inside = plain.features["attention_mask"].astype(bool)
    np.testing.assert_allclose(got["logits"][inside], expected["logits"][inside], atol=1e-5)
  else:  # [features, labels]
    np.testing.assert_allclose(got["logits"], expected["logits"], atol=1e-5)


@pytest.mark.parametrize("case", ["classification", "ner"])
def test_an_example_cannot_see_the_others_in_its_row(files, case):
  cfg = _config(files, case, packing=True)
  packed, labels = _splits(cfg)
  task = _task(cfg, labels, None)
  params = sharding.unbox(task.init_params(jax.random.key(0)))
  batch = next(packed.eval_batches(16, 0, 1))
  row = int(np.argmax((batch["cls_positions"] >= 0).sum(axis=1)))  # a row of several examples
  changed = {k: v.copy() for k, v in batch.items()}
  first = changed["segment_ids"][row] == 1
  changed["input_ids"][row, first] = np.random.default_rng(0).integers(5, 20, first.sum())
  predict = jax.jit(task.predict_fn)
  before, after = predict(params, batch)["logits"], predict(params, changed)["logits"]
  others = batch["cls_positions"] >= 0  # [rows, slots]: the examples (empty slots read row 0)
  others[row, 0] = False
  assert not np.allclose(before[row, 0], after[row, 0])
  np.testing.assert_allclose(np.asarray(after)[others], np.asarray(before)[others], atol=1e-6)


@pytest.mark.parametrize("case", ["classification", "pairs", "ner"])
def test_packed_training_and_scores_equal_the_same_examples_unpacked(files, case):
  # A short run on the packed loader's batches and on the same examples one per row (padded
  # with weight-0 rows to a fixed batch): equal losses at every step, then equal eval loss
  # and scores on the dev split packed and unpacked.
  packed_cfg, plain_cfg = _config(files, case, True), _config(files, case, False)
  packed, labels = _splits(packed_cfg)
  plain, _ = _splits(plain_cfg)
  dev_packed, dev_plain = _splits(packed_cfg, "dev")[0], _splits(plain_cfg, "dev")[0]
  for cfg in (packed_cfg, plain_cfg):
    cfg.train.steps, cfg.optim.warmup_steps = 3, 1
  packed_task = _task(packed_cfg, labels, dev_packed)
  plain_task = _task(plain_cfg, labels, dev_plain)
  mesh = loop.make_mesh(plain_cfg)
  packed_steps, plain_steps = (loop.build_steps(c, t, mesh) for c, t in
                               ((packed_cfg, packed_task), (plain_cfg, plain_task)))
  init = jax.jit(plain_steps.init_state, out_shardings=plain_steps.state_shardings)
  states = [init(jax.random.key(0)), init(jax.random.key(0))]
  rows = plain.device_arrays()
  batches = loader.feature_train_iterator(packed.device_arrays(), loader.HostLayout(8), seed=0)
  with sharding.activation_sharding(mesh):
    for _ in range(3):
      batch = next(batches)
      index = batch["feature_index"][batch["feature_index"] >= 0]
      alone = {k: v[np.resize(index, 8 * SLOTS)] for k, v in rows.items()}  # [8 * SLOTS, ...]
      alone["weights"][len(index):] = 0.0
      states[0], packed_sums = packed_steps.train_step(states[0],
                                                       sharding.global_batch(batch, mesh))
      states[1], plain_sums = plain_steps.train_step(states[1], sharding.global_batch(alone, mesh))
      assert float(packed_sums["weight"]) == float(plain_sums["weight"])
      for name in ("loss_sum", "grad_norm"):
        np.testing.assert_allclose(float(packed_sums[name]), float(plain_sums[name]), rtol=1e-5,
                                   err_msg=name)
    scores = [evaluation.evaluate(task, steps, s.params, split.eval_batches(16, 0, 1), mesh)
              for task, steps, s, split in ((packed_task, packed_steps, states[0], dev_packed),
                                            (plain_task, plain_steps, states[1], dev_plain))]
  assert scores[0].keys() == scores[1].keys()
  for name in scores[0]:
    np.testing.assert_allclose(scores[0][name], scores[1][name], rtol=1e-4, err_msg=name)


def test_the_packed_batch_spec_compiles_ahead_of_time_for_the_loaders_batches(files):
  # `jaxfm.aot` compiles from `Task.batch_spec`: with packing it must describe packed rows.
  cfg = _config(files, "ner", packing=True)
  packed, labels = _splits(cfg)
  cfg.train.steps = 2
  task = _task(cfg, labels, None)
  mesh = loop.make_mesh(cfg)
  steps = loop.build_steps(cfg, task, mesh)
  compiled, _ = loop.compile_train_step(steps, steps.abstract_batch(task, 8), mesh)
  state = jax.jit(steps.init_state, out_shardings=steps.state_shardings)(jax.random.key(0))
  batch = next(loader.feature_train_iterator(packed.device_arrays(), loader.HostLayout(8), seed=0))
  assert batch.keys() == task.batch_spec.keys()
  with sharding.activation_sharding(mesh):
    _, sums = compiled(state, sharding.global_batch(batch, mesh))
  assert float(sums["weight"]) > 0


# ---------------------------------------------------------------- runs and config

def test_a_packed_run_records_its_padding_share_and_predicts_one_row_per_input(files):
  # A row holds ~6 examples here, so an epoch is ~6 times fewer steps: batch 8, more epochs.
  cfg = _config(files, "classification", packing=True)
  cfg.train.batch_size, cfg.train.epochs = 8, 8.0
  workdir = str(files["root"] / "packed_run")
  _, best_step = run.finetune(cfg, workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    share = json.load(f)["config"]["data"]["padding_share"]
  assert 1.0 <= share < 1.2
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    best = next(r for r in map(json.loads, f) if r["split"] == "eval" and r["step"] == best_step)
  assert best["accuracy"] > 0.9
  scores = run.evaluate(workdir, "dev")
  assert scores == pytest.approx({k: best[k] for k in scores}, rel=1e-5)
  inputs = files["root"] / "inputs.jsonl"
  sentences = [line.split("\t")[0] for line in
               open(files["classification"][1]).read().splitlines()[1:]]
  inputs.write_text("".join(json.dumps({"sentence": s}) + "\n" for s in sentences))
  rows = run.predict(workdir, str(inputs))
  assert [r["guid"] for r in rows] == [f"{inputs}:{i}" for i in range(1, len(sentences) + 1)]


def test_packing_is_refused_for_qa_and_bounded_per_row(files):
  cfg = ff.config("qa", files["model_dir"], "train.json", "dev.json")
  cfg.data.packing = True
  with pytest.raises(config_lib.ConfigError, match="data.packing=True is not supported for "
                     "task='qa'"):
    tasks.validate_finetune(cfg)
  cfg = _config(files, "ner", packing=True)
  cfg.data.max_examples_per_row = ff.SEQ // 2 + 1
  with pytest.raises(config_lib.ConfigError, match="data.max_examples_per_row=17 must be in"):
    tasks.validate_finetune(cfg)
