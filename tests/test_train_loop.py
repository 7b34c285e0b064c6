"""The generic loop on 8 fake devices: learning, bitwise resume, meshes, accumulation, NaN skipping."""

import json
import os
import signal

import jax
import numpy as np

from tests import train_helpers as th


def _losses(workdir):
  by_step = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if record["split"] == "train":
      by_step[record["step"]] = record["loss"]  # a resumed run rewrites steps it repeats
  return [by_step[s] for s in sorted(by_step)]


def _params(workdir, cfg):
  from jaxfm.train import checkpoint
  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(checkpoint.checkpoint_dir(str(workdir)))
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, jax.tree.map(np.asarray, restored["state"]["params"])


def test_loss_falls_and_eval_runs(tmp_path):
  cfg = _no_dropout(th.tiny_config(steps=40, eval_every=40))
  cfg.optim.peak_learning_rate = 3e-3
  result = th.run(cfg, tmp_path)
  losses = _losses(tmp_path)
  assert len(losses) == 40 and np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
  assert result.step == 40 and set(result.eval) == {"loss", "accuracy"}
  assert result.eval["loss"] < losses[0] - 1.0


class _SigtermAt(th.RandomMlmBatches):
  """Sends this process SIGTERM while producing batch `at`: the run must stop after that step."""

  def __init__(self, batch_size, at):
    super().__init__(batch_size)
    self.at = at

  def __next__(self):
    if self.index == self.at - 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return super().__next__()


def _preempted_then_resumed(cfg, workdir, at):
  from jaxfm.train import loop
  first = loop.train(cfg, str(workdir), th.mlm_task(cfg), _SigtermAt(cfg.train.batch_size, at),
                     lambda: [], {})
  assert first.preempted and first.step == at
  second = th.run(cfg, workdir)
  assert not second.preempted and second.step == cfg.train.steps


def test_bitwise_resume_after_sigterm(tmp_path):
  cfg = th.tiny_config(steps=20, checkpoint_every=100, eval_batches=0)
  th.run(cfg, tmp_path / "straight")
  _preempted_then_resumed(cfg, tmp_path / "resumed", at=10)
  assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")
  (s1, p1), (s2, p2) = _params(tmp_path / "straight", cfg), _params(tmp_path / "resumed", cfg)
  assert s1 == s2 == 20
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(a, b)


def test_relaunching_a_finished_run_returns_without_compiling(tmp_path, monkeypatch):
  from jaxfm.train import loop
  cfg = th.tiny_config(steps=4, checkpoint_every=100, eval_batches=0)
  th.run(cfg, tmp_path)
  metrics = (tmp_path / "metrics.jsonl").read_text()

  def no_compile(*args):
    raise AssertionError("the train step was compiled")
  monkeypatch.setattr(loop, "compile_train_step", no_compile)
  result = th.run(cfg, tmp_path)
  assert result.step == 4 and not result.train and not result.preempted
  assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_bitwise_resume_with_grad_accumulation(tmp_path):
  cfg = th.tiny_config(steps=8, checkpoint_every=100, grad_accum_steps=2, eval_batches=0)
  th.run(cfg, tmp_path / "straight")
  _preempted_then_resumed(cfg, tmp_path / "resumed", at=3)
  assert _losses(tmp_path / "straight") == _losses(tmp_path / "resumed")


def test_grad_accumulation_matches_one_big_batch(tmp_path):
  th.run(_no_dropout(th.tiny_config(steps=4)), tmp_path / "one")
  th.run(_no_dropout(th.tiny_config(steps=4, grad_accum_steps=4)), tmp_path / "accum")
  np.testing.assert_allclose(_losses(tmp_path / "one"), _losses(tmp_path / "accum"), rtol=1e-5)


def _no_dropout(cfg):
  cfg.model.hidden_dropout = cfg.model.attention_dropout = 0.0
  return cfg


def test_losses_equal_across_meshes(tmp_path):
  def losses_on(mesh):
    cfg = th.tiny_config(steps=4, eval_batches=0)
    cfg.model.num_heads = 4
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh
    th.run(cfg, tmp_path / "x".join(map(str, mesh)))
    return _losses(tmp_path / "x".join(map(str, mesh)))
  reference = losses_on((8, 1, 1))
  for mesh in ((2, 2, 2), (1, 2, 4)):
    np.testing.assert_allclose(losses_on(mesh), reference, rtol=1e-5, atol=1e-5)


class _PoisonedBatches(th.RandomMlmBatches):
  def __next__(self):
    batch = super().__next__()
    if self.index == 3:  # the third batch carries a NaN weight
      batch["masked_weights"][0, 0] = np.nan
    return batch


def test_nonfinite_update_is_skipped_and_counted(tmp_path):
  from jaxfm.train import loop
  cfg = th.tiny_config(steps=4, eval_batches=0)
  result = loop.train(cfg, str(tmp_path), th.mlm_task(cfg), _PoisonedBatches(8), lambda: [], {})
  assert result.train["skipped_steps_total"] == 1
  records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["nonfinite_steps"] for r in records if r["split"] == "train"] == [0, 0, 1, 0]


def test_profile_traces_the_chosen_steps_and_closes_a_trace_the_run_ends_inside(tmp_path):
  cfg = th.tiny_config(steps=4, eval_every=4)
  cfg.train.profile_steps = "1,3"
  th.run(cfg, tmp_path / "window")
  cfg.train.profile_steps = "3,8"  # past the run's last step
  th.run(cfg, tmp_path / "to_the_end")
  for run in ("window", "to_the_end"):
    traces = list((tmp_path / run / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0, run
