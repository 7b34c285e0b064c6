r"""BERT-tiny (L2/H128) MLM on Chinese text: the CPU demo of bert_tiny_cpu.py for Chinese.

The WordPiece vocabulary is trained on the corpus; CJK characters are split one per word as
bert-base-chinese does (lowercased). People's Daily has one paragraph per line, so each line is
a document (its word-segmentation spaces do not change the tokens of CJK text). The vocabulary
trainer keeps only its `limit_alphabet` (1,000) most frequent characters for now, so rarer
characters become [UNK] (issue 32).

  python -m jaxfm.pretrain --config=configs/pretrain/bert_tiny_zh_cpu.py --workdir=runs/tiny_zh \
      --config.data.train_files=../shared/data/chinese/text/peoples_daily_199801_seg.txt
"""

from jaxfm.config import model_config, pretrain_defaults


def get_config():
  cfg = pretrain_defaults()
  cfg.model = model_config("tiny", max_position_embeddings=128)
  cfg.data.documents = "line"
  cfg.data.lowercase = True  # bert-base-chinese is uncased
  # Characters, not sub-words, make up a Chinese vocabulary: a few thousand of them cover this
  # corpus (bert-base-chinese: 21,128 entries for all of Chinese), plus ## pieces and Latin.
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
