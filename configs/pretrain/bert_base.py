r"""BERT-base MLM at sequence length 128, sized for a TPU v5e-8 (batch 256; use the bert-base-uncased
vocab or train one with `python -m jaxfm.tokenizer train`).

  python -m jaxfm.pretrain --config=configs/pretrain/bert_base.py --workdir=gs://BUCKET/run1 \
      --config.data.train_files='gs://BUCKET/corpus/*.txt.gz' \
      --config.data.tokenizer=gs://BUCKET/vocab.txt
"""

from jaxfm.config import model_config, pretrain_defaults


def get_config():
  cfg = pretrain_defaults()
  cfg.model = model_config("base", dtype="bfloat16", scan_layers=True, remat_policy="none")
  cfg.data.vocab_size = 30522
  cfg.data.max_seq_length = 128
  cfg.data.max_predictions_per_seq = 20
  cfg.data.worker_count = 4
  # 32 shards: on 1, 2, 4, ... 32 hosts each reads only 32 / hosts of them (whole files when the
  # corpus has at least 32), and the global batch is the same on every slice size.
  cfg.data.num_shards = 32
  cfg.train.steps = 1_000_000
  cfg.train.batch_size = 256
  cfg.train.log_every = 100
  cfg.train.eval_every = 10_000
  cfg.train.eval_batches = 50
  cfg.train.checkpoint_every = 5_000
  cfg.optim.peak_learning_rate = 1e-4
  cfg.optim.warmup_steps = 10_000
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 1
  return cfg
