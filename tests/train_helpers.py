"""Shared fixtures for loop tests: a synthetic MLM task and a checkpointable random-batch iterator."""

import numpy as np

from jaxfm.config import pretrain_defaults
from jaxfm.models import BertConfig
from jaxfm.tasks import mlm
from jaxfm.train import loop

SEQ, PREDS, VOCAB = 16, 4, 128


class RandomMlmBatches:
  """Batch k is a pure function of (seed, k), so `{'index': k}` is the whole loader state."""

  def __init__(self, batch_size: int, seed: int = 0):
    self.batch_size, self.seed, self.index = batch_size, seed, 0

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.index])
    self.index += 1
    b = self.batch_size
    # Learnable: a row repeats one of 8 tokens, so the loss falls from ln(128) quickly (unigram)
    # and further once the model copies the row's token into the masked slots.
    ids = np.repeat(rng.integers(5, 13, (b, 1)), SEQ, axis=1).astype(np.int32)
    positions = np.stack([rng.choice(np.arange(1, SEQ), PREDS, replace=False) for _ in range(b)])
    labels = np.take_along_axis(ids, positions, 1)
    np.put_along_axis(ids, positions, 4, 1)
    return dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
                masked_positions=positions.astype(np.int32), masked_ids=labels.astype(np.int32),
                masked_weights=np.ones((b, PREDS), np.float32))

  def get_state(self):
    return {"index": self.index}

  def set_state(self, state):
    self.index = state["index"]


def tiny_config(**train):
  cfg = pretrain_defaults()
  cfg.model.vocab_size = VOCAB
  cfg.model.max_position_embeddings = SEQ
  cfg.data.max_seq_length = SEQ
  cfg.data.max_predictions_per_seq = PREDS
  cfg.train.update(dict(steps=20, batch_size=8, log_every=1, eval_every=10, eval_batches=1,
                        checkpoint_every=5, progress_bar=False), **train)
  cfg.optim.warmup_steps = 2
  return cfg


def mlm_task(cfg):
  config = BertConfig.from_mapping({**cfg.model, "embedding_size": cfg.model.embedding_size or None})
  return mlm.mlm_task(config, SEQ, PREDS)


def run(cfg, workdir, seed=0):
  it = RandomMlmBatches(cfg.train.batch_size, seed)
  eval_batches = lambda: [next(RandomMlmBatches(cfg.train.batch_size, seed=99))]
  return loop.train(cfg, str(workdir), mlm_task(cfg), it, eval_batches, meta={"test": True})
