r"""BERT-tiny (L2/H128) MLM on the embedded stdlib-docstring corpus: the 2-core CPU demo.

  python -m jaxfm.pretrain --config=configs/pretrain/bert_tiny_cpu.py --workdir=runs/tiny
"""

from jaxfm.config import model_config, pretrain_defaults


def get_config():
  cfg = pretrain_defaults()
  cfg.model = model_config("tiny", max_position_embeddings=128)
  cfg.data.vocab_size = 8192
  cfg.data.max_seq_length = 128
  cfg.data.max_predictions_per_seq = 20
  cfg.data.worker_count = 0
  cfg.train.steps = 300
  cfg.train.batch_size = 32
  cfg.train.log_every = 10
  cfg.train.eval_every = 100
  cfg.train.eval_batches = 8
  cfg.train.checkpoint_every = 100
  cfg.optim.peak_learning_rate = 2e-3
  cfg.optim.warmup_steps = 30
  return cfg
