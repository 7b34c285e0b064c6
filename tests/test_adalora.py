"""AdaLoRA (jaxfm.peft.adalora): only P, E, Q and the head train; the rank allocator follows
huggingface/peft's RankAllocator step for step, lives in the optimizer state (so a resumed run
continues identically) and ends at the target budget; the exported adapter gives jaxfm's
logits in peft's PyTorch AdaLoraModel.
"""

import json
import pathlib
import shutil
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfm import config as config_lib
from jaxfm import peft
from jaxfm import workdir as workdir_lib
from jaxfm.finetuning import run
from jaxfm.peft import adalora
from jaxfm.train import loop
from jaxfm.train import optim
from jaxfm.train.state import create_train_state
from jaxfm.train.step import make_train_step
from jaxfm.trees import flatten
from tests import finetune_fixtures as ff
from tests.test_peft import (_cli, _config, _inputs, _jaxfm_logits, _peft_model, _torch_logits,
                             classifier_steps, files)

__all__ = ["files"]  # the fixture, shared with test_peft

# 10 steps an epoch: tinit 10, budget falls over steps 11..50, final from step 50 on.
SCHEDULE = dict(init_r=4, target_r=2, tinit=10, tfinal=30, deltaT=5, alpha=8.0,
                target_modules="query,value,output")
EPOCHS = 8.0


def _adalora_config(files, name):
  cfg = _config(files, "classification", ff.write_sentiment, "adalora", epochs=EPOCHS, **SCHEDULE)
  cfg.data.dev_file = ""  # no best checkpoint: the final one is the run's
  cfg.train.checkpoint_every = 40
  cfg.train.keep_checkpoints = 3
  return cfg, str(files / name)


@pytest.fixture(scope="module")
def adalora_run(files):
  cfg, workdir = _adalora_config(files, "adalora")
  return workdir, run.finetune(cfg, workdir)[0]


def test_only_p_e_q_and_the_head_train_and_ranks_end_at_the_target(adalora_run):
  # peft's start (E = 0, P and Q at 0.02) moves this random tiny base too slowly to learn the
  # task in 80 steps; what is checked here is what trains and how the ranks end.
  workdir, result = adalora_run
  assert result.step == 80
  params = run.adapted(workdir).trainable
  adapter = flatten(params["adapter"])
  # query, value and output of both layers, each Q (lora_a), E and P (lora_b).
  assert len(adapter) == 2 * 3 * 3
  assert adapter["encoder/layer_0/query/lora_a"].shape == (128, 4)
  assert adapter["encoder/layer_0/query/lora_e"].shape == (4,)
  assert adapter["encoder/layer_0/query/lora_b"].shape == (4, 2, 64)
  assert adapter["encoder/layer_1/output/lora_a"].shape == (512, 4)
  assert sorted(flatten(params["head"])) == ["classifier/bias", "classifier/kernel",
                                             "encoder/pooler/bias", "encoder/pooler/kernel"]
  # After the final allocation exactly the target budget (6 matrices x target_r) is left,
  # spread unevenly over the modules.
  ranks = {k: int(np.count_nonzero(v)) for k, v in adapter.items() if k.endswith("lora_e")}
  assert sum(ranks.values()) == 6 * SCHEDULE["target_r"]
  assert len(set(ranks.values())) > 1


def _fake_named(init_r: int, matrices: int):
  """What RankAllocator reads of a model to size its budget."""
  torch = pytest.importorskip("torch")
  return types.SimpleNamespace(named_parameters=lambda: iter(
      [(f"m{i}.lora_A.default", torch.zeros(init_r, 1)) for i in range(matrices)]))


@pytest.mark.parametrize("total,tinit,tfinal,delta,init_r,target_r,matrices", [
    (300, 30, 60, 10, 12, 8, 12), (1000, 0, 0, 1, 12, 8, 24), (6315, 600, 1200, 10, 12, 4, 72),
    (97, 7, 13, 3, 5, 1, 9)])
def test_budget_schedule_equals_peft(total, tinit, tfinal, delta, init_r, target_r, matrices):
  tuners = pytest.importorskip("peft.tuners.adalora")
  peft_lib = pytest.importorskip("peft")
  config = peft_lib.AdaLoraConfig(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal,
                                  deltaT=delta, total_step=total, target_modules=["query"])
  theirs = tuners.RankAllocator(_fake_named(init_r, matrices), config, "default")
  settings = peft.Settings(method="adalora", init_r=init_r, target_r=target_r, tinit=tinit,
                           tfinal=tfinal, deltaT=delta)
  steps = np.arange(total + 1)
  budget, mask = jax.jit(adalora.budget_schedule, static_argnums=(1, 2, 3, 4))(
      steps, matrices * init_r, matrices * target_r, settings, total)
  expected = [theirs.budget_schedule(int(s)) for s in steps]
  np.testing.assert_array_equal(budget, [b for b, _ in expected])
  np.testing.assert_array_equal(mask, [m for _, m in expected])


def _torch_holder(torch, weights):
  """A torch module whose parameters are named as peft's AdaLoRA layers (`m{i}.lora_A.default`),
  one per (A [r, in], E [r, 1], B [out, r]) of `weights`."""
  holder = torch.nn.Module()
  for i, (a, e, b) in enumerate(weights):
    module = torch.nn.Module()
    for name, value in (("lora_A", a), ("lora_E", e), ("lora_B", b)):
      setattr(module, name, torch.nn.ParameterDict(
          {"default": torch.nn.Parameter(torch.tensor(np.array(value)))}))
    holder.add_module(f"m{i}", module)
  return holder


def _peft_layout(adapter):
  """[(A [r, in], E [r, 1], B [out, r])] per matrix: layers 0, 1 of the scanned query, then
  layer_2's output."""
  q, o = adapter["encoder"]["layers"]["query"], adapter["encoder"]["layer_2"]["output"]
  per_layer = [{k: v[i] for k, v in q.items()} for i in range(2)] + [o]
  return [(t["lora_a"].T, t["lora_e"][:, None], t["lora_b"].T) for t in per_layer]


def test_allocator_follows_peft_rank_allocator_step_by_step():
  """The same weights and gradients through SGD then peft's `update_and_allocate(t)`, and
  through SGD wrapped in `adalora.allocator`: the same E masks and weights at every step."""
  torch = pytest.importorskip("torch")
  tuners = pytest.importorskip("peft.tuners.adalora")
  peft_lib = pytest.importorskip("peft")
  total, lr = 16, 0.1
  settings = peft.Settings(method="adalora", init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=3)
  config = peft_lib.AdaLoraConfig(init_r=4, target_r=2, tinit=2, tfinal=4, deltaT=3,
                                  total_step=total, target_modules=["query"])
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  adapter = {"encoder": {
      "layers": {"query": {"lora_a": normal(2, 6, 4), "lora_e": normal(2, 4),
                           "lora_b": normal(2, 4, 5)}},
      "layer_2": {"output": {"lora_a": normal(7, 4), "lora_e": normal(4),
                             "lora_b": normal(4, 3)}}}}
  params = {"adapter": adapter, "head": {"kernel": normal(3)}}
  holder = _torch_holder(torch, _peft_layout(adapter))
  owner = types.SimpleNamespace(peft_config={"default": config}, trainable_adapter_name="default",
                                model=holder,
                                rankallocator=tuners.RankAllocator(holder, config, "default"))
  tx = adalora.allocator(optax.with_extra_args_support(optax.sgd(lr)), settings, total)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(total):
    grads = jax.tree.map(lambda x: normal(*x.shape), params)
    for p, g in zip(holder.parameters(), (t for w in _peft_layout(grads["adapter"]) for t in w)):
      p.grad = torch.tensor(np.array(g))
    with torch.no_grad():
      for p in holder.parameters():
        p -= lr * p.grad
    tuners.AdaLoraModel.update_and_allocate(owner, step)
    updates, state = update(grads, state, params)
    params = jax.device_get(optax.apply_updates(params, updates))
    theirs = [p.detach().numpy() for p in holder.parameters()]
    ours = [t for w in _peft_layout(params["adapter"]) for t in w]
    for mine, peft_weight in zip(ours, theirs):
      np.testing.assert_allclose(mine, peft_weight, atol=1e-5, err_msg=f"step {step}")
    np.testing.assert_array_equal([np.asarray(m) == 0 for m in ours[1::3]],
                                  [t == 0 for t in theirs[1::3]], err_msg=f"step {step}")
  assert sum(int(np.count_nonzero(e)) for e in ours[1::3]) == 3 * 2


def test_penalty_is_peft_orthogonality_regulariser():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  a = rng.normal(size=(2, 6, 3)).astype(np.float32)
  b = rng.normal(size=(2, 3, 5)).astype(np.float32)
  adapter = {"encoder": {"layers": {"value": {"lora_a": a, "lora_e": np.ones((2, 3)),
                                               "lora_b": b}}}}
  settings = peft.Settings(method="adalora", init_r=3, orth_reg_weight=0.3)
  expected = 0.0
  for i in range(2):  # peft: lora_A [r, in]: A Aᵀ; lora_B [out, r]: Bᵀ B; mean over the four
    for m in (torch.tensor(a[i].T), torch.tensor(b[i].T)):
      cov = m @ m.T if m.shape[0] == 3 else m.T @ m
      expected += torch.norm(cov - torch.eye(3), p="fro").item() / 4
  assert float(adalora.penalty(adapter, settings)) == pytest.approx(0.3 * expected, rel=1e-5)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_penalty_joins_the_mean_loss_once(micro_batches):
  """The train step differentiates mean task loss + penalty(params), with or without gradient
  accumulation: one SGD step at rate 1 from w gives w - (mean x + 2w) for penalty |w|²."""
  def loss_fn(params, batch, rng):
    del rng
    loss_sum = (batch["x"] @ params["w"]).sum()
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.float32(batch["x"].shape[0])}
  tx = optim.applied_if(optax.sgd(1.0))
  step = make_train_step(loss_fn, tx, optax.constant_schedule(1.0), micro_batches,
                         penalty=lambda params: jnp.sum(params["w"] ** 2))
  w = np.array([0.5, -1.0], np.float32)
  x = np.arange(8, dtype=np.float32).reshape(4, 2)
  state, _ = jax.jit(step)(create_train_state({"w": w}, tx, 0), {"x": x})
  np.testing.assert_allclose(state.params["w"], w - (x.mean(0) + 2 * w), rtol=1e-6)


def test_resume_continues_identically(adalora_run, files):
  """A run stopped at step 40 (mid-budgeting, EMAs and kept triplets in the optimizer state)
  and resumed ends where the uninterrupted run ended."""
  workdir, result = adalora_run
  cfg, resumed = _adalora_config(files, "adalora_resumed")
  shutil.copytree(workdir, resumed)
  checkpoints = pathlib.Path(resumed) / "checkpoints"
  assert sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) == [40, 80]
  shutil.rmtree(checkpoints / "80")
  again, _ = run.finetune(cfg, resumed)
  assert again.step == result.step
  ours, theirs = (flatten(run.adapted(w).trainable) for w in (resumed, workdir))
  for name in theirs:
    np.testing.assert_allclose(ours[name], theirs[name], atol=1e-6, err_msg=name)


def test_peft_format_gives_jaxfm_logits_in_pytorch(adalora_run, files, tmp_path):
  workdir, _ = adalora_run
  model = _peft_model(workdir, tmp_path / "adapter")
  saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
  assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 80
  pattern = saved["rank_pattern"]
  assert sum(map(sum, pattern.values())) == 6 * SCHEDULE["target_r"]
  assert len(pattern["bert.encoder.layer.1.output.dense.lora_E"]) == 4
  inputs = _inputs(workdir_lib.read_model_config(workdir).vocab_size)
  np.testing.assert_allclose(_torch_logits(model, inputs), _jaxfm_logits(workdir, inputs),
                             atol=1e-4)


def test_merged_export_equals_base_plus_adapter(adalora_run, files, tmp_path):
  transformers = pytest.importorskip("transformers")
  workdir, _ = adalora_run
  done = _cli("jaxfm.convert", "--to_hf", f"--from={workdir}", f"--out={tmp_path / 'merged'}")
  assert done.returncode == 0, done.stderr[-3000:]
  merged = transformers.BertForSequenceClassification.from_pretrained(
      str(tmp_path / "merged")).eval()
  inputs = _inputs(merged.config.vocab_size)
  np.testing.assert_allclose(_torch_logits(merged, inputs), _jaxfm_logits(workdir, inputs),
                             atol=1e-5)


def test_the_allocator_state_shards_like_the_adapter(files):
  """On 8 devices as data 2 x fsdp 2 x tensor 2 with scanned layers, the EMAs shard like the
  adapter and the kept triplets like E; the step compiles."""
  cfg, _ = _adalora_config(files, "unused")
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2
  cfg.model.scan_layers = True
  cfg.train.steps = 80
  steps, task, mesh = classifier_steps(cfg)
  specs = lambda tree: {k: tuple(v.spec) for k, v in flatten(tree).items()}
  params = specs(steps.state_shardings.params["adapter"])
  allocator_state = steps.state_shardings.opt_state
  assert isinstance(allocator_state, adalora.AllocatorState)
  assert specs(allocator_state.ipt) == specs(allocator_state.unc) == params
  assert params["encoder/layers/query/lora_a"] == (None, "fsdp", None)  # [layers, hidden, r]
  assert {f"{k}/lora_e": v for k, v in specs(allocator_state.keep).items()} == {
      k: v for k, v in params.items() if k.endswith("lora_e")}
  loop.compile_train_step(steps, steps.abstract_batch(task, cfg.train.batch_size), mesh)


@pytest.mark.parametrize("field,value,message", [
    ("peft.target_r", 16, "peft.target_r=16 exceeds peft.init_r=12"),
    ("peft.beta1", 1.0, "peft.beta1=1.0 must be in (0, 1)"),
    ("peft.deltaT", 0, "peft.deltaT=0 must be > 0")])
def test_bad_settings_are_refused_by_name(field, value, message):
  cfg = config_lib.finetune_defaults()
  cfg.data.train_file, cfg.init_from, cfg.peft.method = "train.tsv", "hf:base", "adalora"
  config_lib.validate_finetune(cfg)
  section, name = field.split(".")
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    config_lib.validate_finetune(cfg)


def test_a_schedule_beyond_the_run_is_refused(files):
  # The fixture's 10 steps an epoch: 2 epochs leave tinit 10 + tfinal 30 no room.
  cfg, workdir = _adalora_config(files, "adalora_short")
  cfg.train.epochs = 2.0
  with pytest.raises(config_lib.ConfigError,
                     match=r"peft.tfinal=30 with peft.tinit=10 leaves no budgeting phase in "
                           r"train.steps=20"):
    run.finetune(cfg, workdir)
