"""Distillation: the losses against written-out references (numpy, torch), the every-k
student, and distilled students on the fine-tuning fixtures (learning, resume, evaluate and
predict on the student's workdir, one-line errors)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import distillation, interop, weights
from jaxfm.distillation import losses, student
from jaxfm.distillation import run as distill_run
from jaxfm.distillation.teacher import load_mlm_teacher, load_teacher
from jaxfm.finetuning import run as finetuning
from jaxfm.train import best, checkpoint
from jaxfm.trees import flatten

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- losses

def test_soft_target_kl_matches_torch_and_hinton():
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(6, 4)) * 3, rng.normal(size=(6, 4)) * 3
  w = np.array([1, 1, 0, 1, 0.5, 1], np.float32)
  temperature = 2.5
  got = losses.soft_target_kl(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                              jnp.asarray(w), temperature)
  # torch: KLDivLoss(log q_student, p_teacher), per example, times T^2 (Hinton et al.).
  per_example = torch.nn.functional.kl_div(
      torch.log_softmax(torch.tensor(s) / temperature, -1),
      torch.softmax(torch.tensor(t) / temperature, -1), reduction="none").sum(-1)
  want = float((per_example * torch.tensor(w, dtype=torch.float64)).sum()) * temperature ** 2
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Written out: sum_i p_i (log p_i - log q_i).
  p = np.exp(t / temperature) / np.exp(t / temperature).sum(-1, keepdims=True)
  q = np.exp(s / temperature) / np.exp(s / temperature).sum(-1, keepdims=True)
  np.testing.assert_allclose(float(got), temperature ** 2 * np.sum(
      w * np.sum(p * (np.log(p) - np.log(q)), -1)), rtol=1e-5)
  assert float(losses.soft_target_kl(jnp.asarray(t), jnp.asarray(t), jnp.asarray(w),
                                     temperature)) == pytest.approx(0.0, abs=1e-6)


def test_soft_target_kl_gradient_is_the_scaled_probability_gap():
  # d/ds of T^2 KL at temperature T is T (q - p): Hinton's reason for the T^2 factor.
  rng = np.random.default_rng(1)
  s, t = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  temperature = 4.0
  grad = jax.grad(lambda x: losses.soft_target_kl(x, jnp.asarray(t), jnp.ones(3),
                                                  temperature))(jnp.asarray(s))
  p = jax.nn.softmax(t / temperature)
  q = jax.nn.softmax(s / temperature)
  np.testing.assert_allclose(grad, temperature * (q - p), rtol=1e-4, atol=1e-6)


def test_soft_target_mse_and_hidden_mse_match_numpy():
  rng = np.random.default_rng(2)
  s, t, w = rng.normal(size=(4, 1)), rng.normal(size=(4, 1)), np.array([1, 0, 1, 1.0])
  np.testing.assert_allclose(float(losses.soft_target_mse(s, t, w)),
                             np.sum(w * (s - t)[:, 0] ** 2), rtol=1e-6)
  hs, ht = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 6))
  kernel, bias = rng.normal(size=(4, 6)), rng.normal(size=6)
  tokens = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
  projected = losses.project(jnp.asarray(hs), {"kernel": jnp.asarray(kernel),
                                               "bias": jnp.asarray(bias)})
  got = losses.hidden_mse(projected, jnp.asarray(ht), jnp.asarray(tokens))
  per_token = ((hs @ kernel + bias - ht) ** 2).mean(-1)
  np.testing.assert_allclose(float(got), (per_token * tokens).sum() / tokens.sum(), rtol=1e-5)


def _relation(a, b, keys):
  """softmax over real keys of a b^T / sqrt(d) per head, written out: [b, heads, t, t]."""
  batch, t, heads, d = a.shape
  out = np.zeros((batch, heads, t, t))
  for i in range(batch):
    for n in range(heads):
      for q in range(t):
        scores = [a[i, q, n] @ b[i, k, n] / np.sqrt(d) if keys[i, k] else -np.inf
                  for k in range(t)]
        e = np.exp(np.array(scores) - max(scores))
        out[i, n, q] = e / e.sum()
  return out


def test_relation_kl_matches_a_hand_computed_value_and_ignores_padding():
  # One example of two tokens, one head of width 1, the first query counted: the teacher's
  # attention is softmax(q k) = softmax([1, 2]), the student's (q = 0) uniform.
  k = jnp.asarray([1.0, 2.0]).reshape(1, 2, 1, 1)  # [b, t, heads, d]
  q_t, q_s = jnp.asarray([1.0, 0.0]).reshape(1, 2, 1, 1), jnp.zeros((1, 2, 1, 1))
  got = losses.relation_kl((q_s, k), (q_t, k), jnp.ones((1, 2)), jnp.asarray([[1.0, 0.0]]))
  p = np.exp([1.0, 2.0]) / np.exp([1.0, 2.0]).sum()
  want = p[0] * np.log(p[0] / 0.5) + p[1] * np.log(p[1] / 0.5)  # KL(p || uniform)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  assert want == pytest.approx(0.1109, abs=1e-4)
  # Random heads with padding: against the written-out softmax, and blind to padded keys.
  rng = np.random.default_rng(3)
  s_q, s_k, t_q, t_k = (rng.normal(size=(2, 4, 2, d)) for d in (3, 3, 5, 5))
  keys = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.float32)
  queries = keys * np.array([[1.0], [0.5]], np.float32)
  got = losses.relation_kl((jnp.asarray(s_q), jnp.asarray(s_k)),
                           (jnp.asarray(t_q), jnp.asarray(t_k)), jnp.asarray(keys),
                           jnp.asarray(queries))
  a_s, a_t = _relation(s_q, s_k, keys), _relation(t_q, t_k, keys)
  with np.errstate(divide="ignore", invalid="ignore"):
    per_key = np.where(a_t > 0, a_t * (np.log(a_t) - np.log(a_s)), 0.0)
  per_query = per_key.sum(-1).mean(1)  # [b, t]
  np.testing.assert_allclose(float(got), (per_query * queries).sum() / queries.sum(), rtol=1e-5)
  s_k_padded = s_k.copy()
  s_k_padded[1, 2:] = 100.0
  assert float(losses.relation_kl((jnp.asarray(s_q), jnp.asarray(s_k_padded)),
                                  (jnp.asarray(t_q), jnp.asarray(t_k)), jnp.asarray(keys),
                                  jnp.asarray(queries))) == pytest.approx(float(got), rel=1e-6)
  assert float(losses.relation_kl((jnp.asarray(t_q), jnp.asarray(t_k)),
                                  (jnp.asarray(t_q), jnp.asarray(t_k)), jnp.asarray(keys),
                                  jnp.asarray(queries))) == pytest.approx(0.0, abs=1e-6)


def test_relation_kl_gradient_reaches_the_student_only_through_real_tokens():
  rng = np.random.default_rng(4)
  s_q, s_k, t_q, t_k = (jnp.asarray(rng.normal(size=(2, 4, 2, 3)), jnp.float32)
                        for _ in range(4))
  keys = jnp.asarray([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.float32)
  grad_q, grad_k = jax.grad(lambda q, k: losses.relation_kl((q, k), (t_q, t_k), keys, keys),
                            argnums=(0, 1))(s_q, s_k)
  assert np.all(np.isfinite(grad_q)) and np.all(np.isfinite(grad_k))
  assert np.abs(grad_q[0, :3]).min() > 0 and np.abs(grad_k[1, :2]).min() > 0
  np.testing.assert_array_equal(grad_q[1, 2:], 0.0)  # padded queries count for nothing
  np.testing.assert_array_equal(grad_k[1, 2:], 0.0)  # padded keys are never attended


def test_relation_heads_concatenate_the_heads_and_split_them_anew():
  # MiniLMv2: 4 heads of width 2 and 2 heads of width 4 give the same 2 relation heads.
  x = np.arange(2 * 3 * 8, dtype=np.float32).reshape(2, 3, 8)
  four, two = x.reshape(2, 3, 4, 2), x.reshape(2, 3, 2, 4)
  np.testing.assert_array_equal(losses.relation_heads(jnp.asarray(four), 2), two)
  np.testing.assert_array_equal(losses.relation_heads(jnp.asarray(two), 2), two)
  np.testing.assert_array_equal(losses.relation_heads(jnp.asarray(four), 1), x[:, :, None])


def test_top_k_kl_equals_the_full_kl_when_k_covers_the_classes_and_renormalises_otherwise():
  rng = np.random.default_rng(5)
  s, t = rng.normal(size=(3, 5)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
  w = jnp.asarray([1.0, 0.5, 0.0])
  full = losses.soft_target_kl(jnp.asarray(s), jnp.asarray(t), w, 2.0)
  order = np.argsort(-t, axis=-1)
  values = np.take_along_axis(t, order, axis=-1)
  np.testing.assert_allclose(float(losses.top_k_kl(jnp.asarray(s), jnp.asarray(values),
                                                   jnp.asarray(order), w, 2.0)),
                             float(full), rtol=1e-5)
  got = losses.top_k_kl(jnp.asarray(s), jnp.asarray(values[:, :2]), jnp.asarray(order[:, :2]),
                        w, 2.0)
  p = np.exp(values[:, :2] / 2) / np.exp(values[:, :2] / 2).sum(-1, keepdims=True)
  log_q = np.log(np.exp(s / 2) / np.exp(s / 2).sum(-1, keepdims=True))
  kl = (p * (np.log(p) - np.take_along_axis(log_q, order[:, :2], -1))).sum(-1)
  np.testing.assert_allclose(float(got), 4 * float((kl * np.asarray(w)).sum()), rtol=1e-5)


# ---------------------------------------------------------------- config and student

def _distill_cfg(**distill):
  cfg = config_lib.distill_defaults()
  cfg.teacher, cfg.data.train_file, cfg.data.dev_file = "t", "train.tsv", "dev.tsv"
  cfg.distill.update(distill)
  return cfg


def test_losses_and_layer_map_parse_and_fail_naming_the_field():
  assert config_lib.distill_losses(_distill_cfg(losses="kl=0.7, task=0.3").distill) == {
      "kl": 0.7, "task": 0.3}
  with pytest.raises(config_lib.ConfigError, match=r"distill.losses=.*unknown loss 'attn'"):
    config_lib.validate_distill(_distill_cfg(losses="kl=1,attn=1"))
  assert config_lib.layer_map(_distill_cfg().distill, 3, 6) == ((0, 0), (1, 2), (2, 4), (3, 6))
  assert config_lib.layer_map(_distill_cfg(layer_map="1:3,2:6").distill, 2, 6) == ((1, 3),
                                                                                   (2, 6))
  with pytest.raises(config_lib.ConfigError, match="distill.layer_map=''"):
    config_lib.layer_map(_distill_cfg().distill, 4, 6)
  with pytest.raises(config_lib.ConfigError, match="distill.layer_map='1:7'"):
    config_lib.layer_map(_distill_cfg(layer_map="1:7").distill, 3, 6)


def test_every_k_takes_each_kth_teacher_layer_and_the_rest_by_name():
  teacher = {"encoder": {"embeddings": {"w": np.full(2, -1.0)},
                         **{f"layer_{i}": {"k": np.full(2, float(i))} for i in range(6)}},
             "classifier": {"kernel": np.full(2, 9.0)}}
  got = flatten(student.every_k_layers(teacher, 2, 3))
  assert sorted(got) == ["classifier/kernel", "encoder/embeddings/w", "encoder/layer_0/k",
                         "encoder/layer_1/k", "encoder/layer_2/k"]
  assert [got[f"encoder/layer_{i}/k"][0] for i in range(3)] == [1.0, 3.0, 5.0]
  assert got["classifier/kernel"][0] == 9.0 and got["encoder/embeddings/w"][0] == -1.0


# ---------------------------------------------------------------- distilled students

@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """A 2-layer tiny teacher fine-tuned on the sentiment fixtures."""
  root = tmp_path_factory.mktemp("distill")
  model_dir = str(ff.write_model_dir(root))
  cfg = ff.config("classification", model_dir, *ff.write_sentiment(root))
  result, _ = finetuning.finetune(cfg, str(root / "teacher"))
  return root, str(root / "teacher"), result


def _config(teacher_run, **distill):
  root, teacher, _ = teacher_run
  cfg = config_lib.distill_defaults()
  base = ff.config("classification", "", str(root / "train.tsv"), str(root / "dev.tsv"))
  for section in ("data", "train", "optim", "model"):
    cfg[section].update(base[section].to_dict())
  cfg.teacher = teacher
  cfg.model.num_layers = 1
  cfg.distill.update(distill)
  return cfg


def test_every_k_student_starts_from_the_teachers_top_layer(teacher_run):
  cfg = _config(teacher_run)
  teacher = load_teacher(cfg)
  start = flatten(student.take_architecture(cfg, teacher))
  assert cfg.model.num_layers == 1 and cfg.model.hidden_size == teacher.config.hidden_size
  source = flatten(teacher.params)
  kernel = "encoder/layer_0/intermediate/kernel"
  np.testing.assert_array_equal(start[kernel], source["encoder/layer_1/intermediate/kernel"])
  assert not np.array_equal(start[kernel], source[kernel])
  np.testing.assert_array_equal(start["classifier/kernel"], source["classifier/kernel"])


def _batch(vocab_size, seed=0):
  """Four rows of 8 tokens, the last two padded after 5 and 3."""
  rng = np.random.default_rng(seed)
  mask = np.ones((4, 8), np.int32)
  mask[2, 5:], mask[3, 3:] = 0, 0
  return {"input_ids": rng.integers(5, vocab_size, (4, 8)).astype(np.int32) * mask,
          "token_type_ids": np.zeros((4, 8), np.int32), "attention_mask": mask,
          "labels": np.array([0, 1, 1, 0], np.int32), "weights": np.ones(4, np.float32),
          "feature_index": np.arange(4, dtype=np.int32)}


def test_minilm_losses_vanish_for_the_teacher_itself_and_teach_a_changed_student(teacher_run):
  cfg = _config(teacher_run, losses="kl=1.0,attention=1.0,value_relation=1.0",
                attention_map="1:1,2:2")
  cfg.model.num_layers = 2  # every_k with k = 1: the teacher itself
  teacher = load_teacher(cfg)
  start = student.take_architecture(cfg, teacher)
  settings = distill_run.loss_settings(cfg, teacher)
  assert settings.attention_pairs == ((1, 1), (2, 2))
  task = distill_run._tasks(cfg, teacher, None, settings)[0]
  batch = {k: jnp.asarray(v) for k, v in _batch(teacher.config.vocab_size).items()}
  params = {"student": start, "teacher": teacher.params}
  loss_fn = jax.jit(task.loss_fn)
  _, sums = loss_fn(params, batch, None)
  for name in ("kl_sum", "attention_sum", "value_relation_sum"):
    assert abs(float(sums[name])) < 1e-5, name
  kernel = start["encoder"]["layer_1"]["attention"]["qkv_kernel"]
  changed = jax.tree.map(lambda x: x, start)
  changed["encoder"]["layer_1"]["attention"]["qkv_kernel"] = kernel + 0.2 * np.random.default_rng(
      0).normal(size=kernel.shape).astype(np.float32)

  def attention(kernel_1):
    tree = jax.tree.map(lambda x: x, changed)
    tree["encoder"]["layer_1"]["attention"]["qkv_kernel"] = kernel_1
    sums = loss_fn({"student": tree, "teacher": teacher.params}, batch, None)[1]
    return sums["attention_sum"] + sums["value_relation_sum"]
  loss, grad = jax.value_and_grad(attention)(
      jnp.asarray(changed["encoder"]["layer_1"]["attention"]["qkv_kernel"]))
  assert float(loss) > 1e-3 and np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0


def test_minilm_losses_need_the_teachers_heads(teacher_run):
  cfg = _config(teacher_run, student_init="random", losses="kl=1.0,attention=1.0")
  cfg.model.update(hidden_size=64, num_heads=4, intermediate_size=128)
  teacher = load_teacher(cfg)
  student.take_architecture(cfg, teacher)
  with pytest.raises(config_lib.ConfigError, match=r"model.num_heads=4 .*teacher's 2 heads"):
    distill_run.loss_settings(cfg, teacher)
  cfg.model.num_heads, cfg.distill.attention_map = 2, "0:1"
  with pytest.raises(config_lib.ConfigError, match=r"distill.attention_map='0:1'"):
    distill_run.loss_settings(cfg, teacher)


def test_minilm_v2_relation_heads_teach_a_student_of_other_heads(teacher_run):
  # A random student of 4 heads in 64 features against the teacher's 2 heads in 128: query,
  # key and value relations over 2 relation heads, with gradients to the student's QKV.
  cfg = _config(teacher_run, student_init="random", relation_heads=2,
                losses="kl=1.0,query_relation=1.0,key_relation=1.0,value_relation=1.0")
  cfg.model.update(hidden_size=64, num_heads=4, intermediate_size=128)
  teacher = load_teacher(cfg)
  student.take_architecture(cfg, teacher)
  settings = distill_run.loss_settings(cfg, teacher)
  task, init_trainable, _ = distill_run._tasks(cfg, teacher, None, settings)
  trainable = distill_run.sharding.unbox(init_trainable(jax.random.key(0)))
  batch = {k: jnp.asarray(v) for k, v in _batch(teacher.config.vocab_size).items()}

  def relations(params):
    sums = task.loss_fn({**params, "teacher": teacher.params}, batch, None)[1]
    return sum(sums[f"{n}_relation_sum"] for n in ("query", "key", "value")), sums
  (loss, sums), grad = jax.jit(jax.value_and_grad(relations, has_aux=True))(trainable)
  assert all(float(sums[f"{n}_relation_sum"]) > 1e-3 for n in ("query", "key", "value"))
  kernel = grad["student"]["encoder"]["layer_0"]["attention"]["qkv_kernel"]
  assert np.all(np.isfinite(kernel)) and float(jnp.abs(kernel).max()) > 0
  cfg.distill.relation_heads = 3
  with pytest.raises(config_lib.ConfigError, match=r"distill.relation_heads=3 must divide the "
                     r"student's attention width 64"):
    distill_run.loss_settings(cfg, teacher)
  cfg.distill.update(relation_heads=2, losses="kl=1.0,attention=1.0")
  with pytest.raises(config_lib.ConfigError, match=r"distill.relation_heads=2 .*use "
                     r"query_relation and key_relation"):
    config_lib.validate_distill(cfg)


@pytest.fixture(scope="module")
def student_run(teacher_run):
  cfg = _config(teacher_run, losses="kl=0.5,task=0.5,hidden=1.0,attention=1.0,"
                "value_relation=1.0")
  workdir = str(teacher_run[0] / "student")
  result, best_step = distill_run.distill(cfg, workdir)
  return workdir, result, best_step


def test_distilled_student_approaches_the_teacher(teacher_run, student_run):
  _, _, teacher = teacher_run
  workdir, result, best_step = student_run
  assert teacher.eval["accuracy"] >= 0.9  # the fixtures are learnable
  assert result.eval["accuracy"] >= teacher.eval["accuracy"] - 0.1 and best_step is not None
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    train = [r for r in map(json.loads, f) if r["split"] == "train"]
  assert {"kl_loss", "task_loss", "hidden_loss", "attention_loss",
          "value_relation_loss"} <= set(train[-1])
  for name in ("kl_loss", "attention_loss", "value_relation_loss"):
    assert train[-1][name] < train[0][name], name
  saved = json.loads(open(os.path.join(workdir, "config.json")).read())["config"]
  assert saved["teacher"] == teacher_run[1] and len(saved["distill"]["teacher_sha256"]) == 64


def test_evaluate_and_predict_read_the_student_workdir(teacher_run, student_run, tmp_path):
  workdir, result, _ = student_run
  metrics = finetuning.evaluate(workdir, "dev")
  best = json.loads(open(os.path.join(workdir, "config.json")).read())
  assert best["config"]["model"]["num_layers"] == 1
  assert metrics["accuracy"] >= result.eval["accuracy"]  # the best checkpoint
  inputs = tmp_path / "in.jsonl"
  inputs.write_text('{"sentence": "the movie was good"}\n{"sentence": "a very bad film"}\n')
  rows = finetuning.predict(workdir, str(inputs))
  assert [r["label"] for r in rows] == ["1", "0"]


def _latest_state(workdir):
  return checkpoint.restore_latest_params(workdir)


@pytest.mark.slow
def test_random_narrow_student_with_projection_resumes_exactly(teacher_run, monkeypatch):
  # A random student half the teacher's width matches the teacher's hidden states through
  # learned projections (saved with the state, not in best/); a SIGTERM mid-run and a resume
  # give the uninterrupted run's params, projections included.
  root = teacher_run[0]

  def cfg():
    c = _config(teacher_run, student_init="random", losses="kl=1.0,task=0.5,hidden=1.0")
    c.model.update(hidden_size=64, num_heads=2, intermediate_size=128)
    return c
  straight, _ = distill_run.distill(cfg(), str(root / "narrow"))
  iterator = distill_run.loader.feature_train_iterator
  monkeypatch.setattr(distill_run.loader, "feature_train_iterator",
                      lambda *a, **k: ff.SigtermAtBatch(iterator(*a, **k), 7))
  first, _ = distill_run.distill(cfg(), str(root / "narrow_resumed"))
  assert first.preempted and first.step == 7
  monkeypatch.setattr(distill_run.loader, "feature_train_iterator", iterator)
  resumed, _ = distill_run.distill(cfg(), str(root / "narrow_resumed"))
  assert resumed.step == straight.step
  step_a, a = _latest_state(str(root / "narrow"))
  step_b, b = _latest_state(str(root / "narrow_resumed"))
  assert step_a == step_b and "projection" in a and set(a["projection"]) == {"0_0", "1_2"}
  for name, value in flatten(a).items():
    np.testing.assert_allclose(flatten(b)[name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  assert resumed.eval == straight.eval
  with open(os.path.join(root / "narrow", "metrics.jsonl")) as f:
    hidden = [r["hidden_loss"] for r in map(json.loads, f) if r["split"] == "train"]
  assert hidden[-1] < 0.7 * hidden[0]  # the projected states move toward the teacher's
  _, best_params, best_metrics = best.restore_best(str(root / "narrow"))
  assert "projection" not in best_params and "encoder" in best_params  # the student alone
  assert finetuning.evaluate(str(root / "narrow"), "dev")["accuracy"] == best_metrics["accuracy"]


# ---------------------------------------------------------------- cached teacher

def _train_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == "train"]


def _assert_same_losses(in_step, cached):
  """The two 6-step runs logged the same (non-zero) kl and the same losses at every step."""
  want, got = _train_metrics(str(in_step)), _train_metrics(str(cached))
  assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 7))
  assert min(r["kl_loss"] for r in want) > 1e-4
  for a, b in zip(want, got):
    for name in ("loss", "kl_loss", "task_loss"):
      assert b[name] == pytest.approx(a[name], abs=1e-5, rel=1e-5), (a["step"], name)


def _short(cfg, steps=6):
  cfg.train.update(epochs=0.0, steps=steps, log_every=1, eval_every=steps)
  return cfg


def test_cached_teacher_gives_the_in_step_losses_and_is_not_recomputed(teacher_run,
                                                                      monkeypatch):
  # k = 2 covers both labels: the cached soft targets are the in-step ones, step by step. A
  # run preempted and resumed reads the cache the first run wrote.
  root = teacher_run[0]
  in_step, _ = distill_run.distill(_short(_config(teacher_run, losses="kl=0.7,task=0.3")),
                                   str(root / "in_step"))

  def cached():
    return _short(_config(teacher_run, losses="kl=0.7,task=0.3", teacher_top_k=2,
                          teacher_cache=str(root / "cache")))
  iterator = distill_run.loader.feature_train_iterator
  monkeypatch.setattr(distill_run.loader, "feature_train_iterator",
                      lambda *a, **k: ff.SigtermAtBatch(iterator(*a, **k), 4))
  first, _ = distill_run.distill(cached(), str(root / "cached"))
  assert first.preempted and first.step == 4
  parts = sorted(p.name for p in (root / "cache").iterdir())
  assert parts == ["cache.json", "part-000000000-000000160.npz"]
  monkeypatch.setattr(distill_run.loader, "feature_train_iterator", iterator)

  def no_teacher(*args):
    raise AssertionError("the teacher ran again")
  monkeypatch.setattr(distill_run.cache, "_teacher_pass", no_teacher)
  resumed, _ = distill_run.distill(cached(), str(root / "cached"))
  assert resumed.step == in_step.step == 6
  _assert_same_losses(root / "in_step", root / "cached")
  assert "kl_loss" not in resumed.eval and "accuracy" in resumed.eval  # dev: no teacher


def _cache_inputs(cfg):
  """What `cache.teacher_outputs` takes besides `cfg`: the teacher, its task and the training
  features (`cfg` takes the student's architecture)."""
  teacher = load_teacher(cfg)
  student.take_architecture(cfg, teacher)
  teacher_task = distill_run._tasks(cfg, teacher, None, distill_run.loss_settings(
      cfg, teacher))[2]
  train, _ = distill_run.load_split("classification", cfg.data, cfg.data.train_file,
                                    teacher.tokenizer.backend, teacher.label_names)
  return teacher, teacher_task, train.device_arrays()


def test_teacher_cache_pass_over_length_sorted_batches_keeps_feature_order(teacher_run,
                                                                           tmp_path):
  # Rows sorted by length and cut to the buckets give the teacher's logits row for row.
  cfg = _config(teacher_run, teacher_cache=str(tmp_path / "cache"), teacher_top_k=2)
  cfg.data.length_buckets = "8,16"
  teacher, teacher_task, features = _cache_inputs(cfg)
  assert len(set(features["attention_mask"].sum(axis=1))) > 1  # rows of several lengths
  cached = distill_run.cache.teacher_outputs(cfg, teacher, teacher_task, features)
  logits = jax.jit(teacher_task.predict_fn)(teacher.params, features)["logits"]  # full length
  # Two labels, k = 2: every logit in class order.
  np.testing.assert_allclose(cached[distill_run.cache.VALUES][:, 0], logits, rtol=1e-5,
                             atol=1e-6)
  assert np.ptp(np.asarray(logits)[:, 0]) > 1e-3  # rows differ: their order matters


def test_teacher_cache_resumes_a_cut_pass_and_refuses_another_teacher_or_data(
    teacher_run, tmp_path, monkeypatch):
  cfg = _config(teacher_run, teacher_cache=str(tmp_path / "cache"), teacher_top_k=1)
  teacher, teacher_task, features = _cache_inputs(cfg)
  monkeypatch.setattr(distill_run.cache, "CHUNK", 64)
  whole = distill_run.cache.teacher_outputs(cfg, teacher, teacher_task, features)
  values, indices = whole[distill_run.cache.VALUES], whole[distill_run.cache.INDICES]
  assert values.shape == indices.shape == (160, 1, 1)  # top-1 of 2 labels, per example
  (tmp_path / "cache" / "part-000000064-000000128.npz").unlink()  # a pass cut short
  passes = []
  teacher_pass = distill_run.cache._teacher_pass

  def counting(*args):
    run = teacher_pass(*args)
    return lambda chunk: passes.append(len(chunk["input_ids"])) or run(chunk)
  monkeypatch.setattr(distill_run.cache, "_teacher_pass", counting)
  again = distill_run.cache.teacher_outputs(cfg, teacher, teacher_task, features)
  assert passes == [64]
  np.testing.assert_allclose(again[distill_run.cache.VALUES], values, rtol=1e-6)
  np.testing.assert_array_equal(again[distill_run.cache.INDICES], indices)
  with pytest.raises(config_lib.ConfigError, match=r"^teacher=.*differs from what "
                     r"distill.teacher_cache=.*teacher_sha256"):
    distill_run.cache.teacher_outputs(cfg, dataclasses.replace(teacher, sha256="0" * 64),
                                      teacher_task, features)
  fewer = {k: v[:-1] for k, v in features.items()}
  with pytest.raises(config_lib.ConfigError, match=r"^data.train_file=.*num_examples 160"):
    distill_run.cache.teacher_outputs(cfg, teacher, teacher_task, fewer)
  other = {**features, "input_ids": features["input_ids"][::-1].copy()}
  with pytest.raises(config_lib.ConfigError, match=r"^data.train_file=.*examples_crc32"):
    distill_run.cache.teacher_outputs(cfg, teacher, teacher_task, other)
  cfg.distill.teacher_top_k = 4
  with pytest.raises(config_lib.ConfigError, match=r"^distill.teacher_top_k=4 differs"):
    distill_run.cache.teacher_outputs(cfg, teacher, teacher_task, features)


# ---------------------------------------------------------------- task-agnostic (MLM)

def test_cosine_distance_matches_a_hand_computed_value():
  s = jnp.asarray([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])  # [1, 3, 2]
  t = jnp.asarray([[[0.0, 2.0], [2.0, 2.0], [1.0, 0.0]]])
  got = losses.cosine_distance(s, t, jnp.asarray([[1.0, 1.0, 0.0]]))  # the third is padding
  assert float(got) == pytest.approx(((1 - 0.0) + (1 - 1.0)) / 2, abs=1e-6)


def _mlm_config(root, **distill):
  words = ff.POSITIVE + ff.NEGATIVE + ff.FILLER
  rng = np.random.default_rng(6)
  (root / "corpus.txt").write_text("\n\n".join(
      "\n".join(" ".join(rng.choice(words, 12)) + " ." for _ in range(3)) for _ in range(60)))
  cfg = config_lib.distill_mlm_defaults()
  cfg.teacher = str(root / "mlm_teacher")
  cfg.model.num_layers = 1
  cfg.data.update(train_files=str(root / "corpus.txt"), max_seq_length=ff.SEQ,
                  max_predictions_per_seq=5, worker_count=0, eval_fraction=0.1)
  cfg.train.update(steps=12, batch_size=8, log_every=1, eval_every=12, eval_batches=2,
                   checkpoint_every=12, progress_bar=False)
  cfg.optim.update(peak_learning_rate=2e-3, warmup_steps=0)
  cfg.distill.update(distill)
  return cfg


def test_mlm_student_of_an_mlm_teacher_learns_and_is_written_as_a_model_dir(teacher_run):
  # DistilBERT on the pretraining corpus: a random student of the teacher's width moves toward
  # the teacher's masked-token distributions and last hidden states; the finished student is a
  # model dir that fine-tuning reads as init_from.
  root = teacher_run[0]
  config, params, tokenizer = weights.read_pretrained(str(root / "pretrained"), "mlm")[:3]
  bias = params["mlm_head"]["bias"]  # a peaked teacher: the random MLM's output is near uniform
  params["mlm_head"]["bias"] = 3.0 * np.random.default_rng(7).normal(size=bias.shape)
  interop.save_model_dir(str(root / "mlm_teacher"), config, params,
                         [str(p) for p in pathlib.Path(tokenizer).iterdir()])
  workdir = str(root / "mlm_student")
  cfg = _mlm_config(root, student_init="random", losses="kl=5.0,task=2.0,cosine=1.0")
  cfg.model.update(num_heads=2, intermediate_size=128)
  result, best_step = distillation.distill(cfg, workdir)
  assert result.step == 12 and best_step is None and not result.preempted
  train = _train_metrics(workdir)
  assert {"kl_loss", "task_loss", "cosine_loss", "accuracy"} <= set(train[-1])
  for name in ("kl_loss", "cosine_loss"):
    first, last = (np.mean([r[name] for r in rows]) for rows in (train[:3], train[-3:]))
    assert last < 0.9 * first, (name, [r[name] for r in train])
  saved = weights.read_pretrained(os.path.join(workdir, "student"), "mlm")
  assert saved.config.num_layers == 1 and saved.tokenizer_dir is not None
  step, state = checkpoint.restore_latest_params(workdir)
  for name, value in flatten(state["student"]).items():
    np.testing.assert_array_equal(flatten(saved.params)[name], value, err_msg=name)


def test_mlm_teacher_without_an_mlm_head_is_refused(teacher_run):
  cfg = _mlm_config(teacher_run[0])
  cfg.teacher = teacher_run[1]  # a fine-tuned classifier: encoder, pooler and classifier only
  with pytest.raises(config_lib.ConfigError, match=r"^teacher=.* has no MLM head"):
    load_mlm_teacher(cfg)


def test_mlm_distillation_refuses_fine_tuning_losses_and_a_cache(tmp_path):
  cfg = config_lib.distill_mlm_defaults()
  cfg.teacher = "hf:teacher"
  cfg.distill.losses = "kl=1,hidden=1"
  with pytest.raises(config_lib.ConfigError, match=r"distill.losses=.*names 'hidden', which "
                     r"task='mlm' does not take"):
    config_lib.validate_distill(cfg)
  cfg.distill.losses, cfg.distill.teacher_cache = "kl=1", str(tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"distill.teacher_cache=.*not for "
                     r"task='mlm'"):
    config_lib.validate_distill(cfg)
  fine_tuning = _distill_cfg(losses="kl=1,cosine=1")
  with pytest.raises(config_lib.ConfigError, match=r"names 'cosine', which task="):
    config_lib.validate_distill(fine_tuning)


def _cli(*args):
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "jaxfm.distill", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", ["sst2_minilm", "sst2_bert_mini", "squad_minilm"])
def test_bad_teacher_is_one_error_line(tmp_path, config):
  """Each task config passes validation and stops at the unreadable teacher."""
  out = _cli(f"--config=configs/distill/{config}.py", f"--workdir={tmp_path / 'w'}",
             f"--config.teacher={tmp_path / 'nope'}", "--config.data.train_file=x.tsv",
             "--config.data.dev_file=y.tsv")
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and (
      f"teacher='{tmp_path / 'nope'}' is not a readable fine-tuning workdir" in errors[0])


def test_bad_mlm_teacher_is_one_error_line(tmp_path):
  out = _cli("--config=configs/distill/mlm_distilbert.py", f"--workdir={tmp_path / 'w'}",
             f"--config.teacher={tmp_path / 'nope'}")
  assert out.returncode == 1
  errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and f"teacher='{tmp_path / 'nope'}' is not readable" in errors[0]


def _task_teacher(teacher_run, task, write):
  """A `task` teacher fine-tuned on the fixtures `write` makes: (train, dev, its workdir, its
  result)."""
  root = teacher_run[0]
  train, dev = write(root)
  cfg = ff.config(task, str(root / "pretrained"), train, dev)
  teacher, _ = finetuning.finetune(cfg, str(root / f"{task}_teacher"))
  return train, dev, str(root / f"{task}_teacher"), teacher


@pytest.fixture(scope="module")
def ner_teacher(teacher_run):
  return _task_teacher(teacher_run, "ner", ff.write_conll)


def _task_config(task, task_teacher, **distill):
  """A distillation config of a 1-layer student of `task_teacher` (`ner_teacher`...)."""
  train, dev, workdir, _ = task_teacher
  cfg = config_lib.distill_defaults()
  cfg.task = task
  base = ff.config(task, "", train, dev)
  for section in ("data", "train", "optim", "model"):
    cfg[section].update(base[section].to_dict())
  cfg.teacher, cfg.model.num_layers = workdir, 1
  cfg.distill.update(distill)
  return cfg


@pytest.mark.slow
def test_ner_student_of_a_bfloat16_teacher(teacher_run, ner_teacher, monkeypatch):
  # Per-token soft targets (the labelled first sub-words) and hidden states at every position,
  # from a teacher whose params and compute are bfloat16 in the step.
  root = teacher_run[0]
  cfg = _task_config("ner", ner_teacher, losses="kl=0.5,task=0.5,hidden=1.0",
                     teacher_dtype="bfloat16")
  train_loop, frozen_dtypes = distill_run.loop.train, set()

  def recording(*args, **kwargs):
    frozen_dtypes.update(np.dtype(x.dtype).name for x in jax.tree.leaves(kwargs["frozen"]))
    return train_loop(*args, **kwargs)
  monkeypatch.setattr(distill_run.loop, "train", recording)
  result, _ = distill_run.distill(cfg, str(root / "ner_student"))
  assert frozen_dtypes == {"bfloat16"}
  teacher = ner_teacher[3]
  assert teacher.eval["f1"] > 0.8
  assert result.eval["f1"] >= teacher.eval["f1"] - 0.1 and "kl_loss" in result.eval


@pytest.mark.slow
def test_ner_student_of_a_cached_top_2_teacher(teacher_run, ner_teacher):
  # Per-token top-2 logits of a 4-label head, cut to the length buckets with the tokens: the
  # student learns from the renormalised top-2 distribution without the teacher in the step.
  root = teacher_run[0]
  cfg = _task_config("ner", ner_teacher, losses="kl=0.5,task=0.5", teacher_top_k=2,
                    teacher_cache=str(root / "ner_cache"))
  result, _ = distill_run.distill(cfg, str(root / "ner_cached_student"))
  assert len(config_lib.length_buckets(cfg.data)) > 1  # batches are cut to shorter lengths
  with np.load(root / "ner_cache" / "part-000000000-000000160.npz") as part:
    assert part["values"].shape == (160, ff.SEQ, 2)
    assert np.all(part["values"][..., 0] >= part["values"][..., 1])
  train = _train_metrics(str(root / "ner_cached_student"))
  assert train[-1]["kl_loss"] < train[0]["kl_loss"]
  assert result.eval["f1"] >= ner_teacher[3].eval["f1"] - 0.1


@pytest.fixture(scope="module")
def qa_teacher(teacher_run):
  return _task_teacher(teacher_run, "qa", ff.write_squad)


def test_qa_span_targets_cached_are_the_in_step_ones(teacher_run, qa_teacher, monkeypatch):
  # The soft targets are the start and end distributions over the window's positions. With
  # k = the window length the cache keeps every position (padding as [CLS] with a logit no
  # softmax picks), so on batches cut to length buckets its kl is the in-step one, step by step.
  root = teacher_run[0]

  def short(**distill):
    cfg = _short(_task_config("qa", qa_teacher, losses="kl=0.7,task=0.3", **distill))
    cfg.data.update(length_buckets="24,32", group_by_length=True)
    return cfg
  iterators, make = [], distill_run.loader.feature_train_iterator
  monkeypatch.setattr(distill_run.loader, "feature_train_iterator", lambda *a, **k: (
      iterators.append(ff.SigtermAtBatch(make(*a, **k), None)) or iterators[-1]))
  in_step, _ = distill_run.distill(short(), str(root / "qa_in_step"))
  cached, _ = distill_run.distill(short(teacher_top_k=ff.SEQ, teacher_cache=str(root / "qa_cache")),
                                  str(root / "qa_cached"))
  assert iterators[0].lengths == iterators[1].lengths and 24 in iterators[1].lengths
  (part,) = (root / "qa_cache").glob("part-*.npz")
  with np.load(part) as arrays:
    values, indices = arrays["values"], arrays["indices"]
  assert values.shape[1:] == (2, ff.SEQ)
  padding = values <= distill_run.losses.MASKED
  assert padding.any() and not padding.all(axis=-1).any() and np.all(indices[padding] == 0)
  _assert_same_losses(root / "qa_in_step", root / "qa_cached")
  assert cached.step == in_step.step and "f1" in cached.eval


@pytest.mark.slow
def test_qa_student_of_a_cached_top_4_teacher_learns(teacher_run, qa_teacher):
  # Four positions per span end: the renormalised top-4 start and end distributions teach a
  # 1-layer student (every_k) close to its teacher without the teacher in the step.
  root = teacher_run[0]
  cfg = _task_config("qa", qa_teacher, losses="kl=0.5,task=0.5", teacher_top_k=4,
                     teacher_cache=str(root / "qa_top4"))
  result, _ = distill_run.distill(cfg, str(root / "qa_student"))
  train = _train_metrics(str(root / "qa_student"))
  assert np.isfinite([r["kl_loss"] for r in train]).all()
  assert train[-1]["kl_loss"] < train[0]["kl_loss"]
  teacher = qa_teacher[3]
  assert teacher.eval["f1"] > 50.0
  assert result.eval["f1"] >= teacher.eval["f1"] - 10.0, (result.eval, teacher.eval)
