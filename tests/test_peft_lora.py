"""LoRA's two forms (`jaxfm.peft.lora`): folded into the kernels, and beside the projections
through the encoder's hook, which carries peft's input dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfm import peft
from jaxfm.finetuning import run
from jaxfm.peft import lora
from jaxfm.trees import flatten, unflatten
from tests import finetune_fixtures as ff
from tests.test_peft import _config, files  # noqa: F401 (fixture)
from tests.test_peft_hooks import _inputs, _randomised, _task_model


def _forms(scan, dropout, targets="all-linear"):
  """(model, plan, trainable with a randomised adapter, frozen) of a tiny sequence classifier."""
  _, model, params, base = _task_model("sequence", scan_layers=scan)
  params = jax.tree.map(jnp.asarray, params)
  plan = peft.Plan(peft.Settings("lora", rank=4, alpha=8.0, dropout=dropout,
                                 target_modules=targets), base)
  trainable = plan.trainable(params, jax.random.key(1))
  trainable = {**trainable, "adapter": _randomised(trainable["adapter"], seed=2)}
  return model, plan, trainable, plan.frozen(params)


def _with_hook(plan, trainable, frozen):
  """The model's params with the adapter beside the projections (the hook), whatever the
  dropout: the frozen base, the head and `encoder/peft/lora`."""
  flat = {**flatten(frozen), **flatten(trainable["head"])}
  hooks = lora.hooks(trainable["adapter"], plan.settings, peft.EncoderDims.of(flat))
  return unflatten({**flat, **flatten(hooks, prefix="encoder/peft/")})


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("targets", ["all-linear", "query,value"])
def test_activation_form_equals_folded_form(scan, targets):
  model, plan, trainable, frozen = _forms(scan, 0.0, targets)
  inputs = _inputs()
  folded = np.asarray(model.apply({"params": plan.merge(trainable, frozen)}, *inputs))
  beside = np.asarray(model.apply({"params": _with_hook(plan, trainable, frozen)}, *inputs))
  plain = np.asarray(model.apply({"params": {**frozen, **trainable["head"]}}, *inputs))
  assert np.abs(folded - plain).max() > 1e-3  # the adapter acts
  np.testing.assert_allclose(beside, folded, atol=1e-5)


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_acts_in_training_only_and_draws_from_the_seed(scan):
  model, plan, trainable, frozen = _forms(scan, 0.3)
  params = plan.combine(trainable, frozen)
  assert "lora" in params["encoder"]["peft"]  # dropout > 0 trains beside the projections
  inputs = _inputs()
  folded = np.asarray(model.apply({"params": plan.merge(trainable, frozen)}, *inputs))
  # Evaluation (deterministic): no dropout, the merged model's outputs.
  np.testing.assert_allclose(np.asarray(model.apply({"params": params}, *inputs)), folded,
                             atol=1e-5)

  def train(seed):
    return np.asarray(model.apply({"params": params}, *inputs, deterministic=False,
                                  rngs={"dropout": jax.random.key(seed)}))
  np.testing.assert_array_equal(train(0), train(0))
  assert np.abs(train(0) - folded).max() > 1e-3
  assert np.abs(train(0) - train(1)).max() > 1e-3
  # Without dropout training folds: the same function as the merged model.
  no_dropout = peft.Plan(peft.Settings("lora", rank=4, alpha=8.0, target_modules="all-linear"),
                         plan.base_names)
  assert "peft" not in no_dropout.combine(trainable, frozen)["encoder"]


def test_training_with_dropout_is_deterministic_and_differs_from_without(files):
  def trained(name, dropout):
    cfg = _config(files, "classification", ff.write_sentiment, "lora", epochs=1.0, rank=4,
                  dropout=dropout)
    run.finetune(cfg, str(files / name))
    return flatten(run.adapted(str(files / name)).trainable["adapter"])

  first, again, without = trained("drop_a", 0.1), trained("drop_b", 0.1), trained("nodrop", 0.0)
  for key, value in first.items():
    np.testing.assert_array_equal(value, again[key])
  assert max(np.abs(first[k] - without[k]).max() for k in first if k.endswith("lora_b")) > 1e-6
