r"""SQuAD v1.1 extractive QA (v2.0 with --config.data.version_2=True); dev F1 picks the best.

  python -m jaxfm.finetune --config=configs/finetune/squad.py --workdir=runs/squad \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=train-v1.1.json --config.data.dev_file=dev-v1.1.json
  python -m jaxfm.evaluate --workdir=runs/squad --split=dev
"""

from jaxfm.config import finetune_defaults


def get_config():
  cfg = finetune_defaults()
  cfg.task = "qa"
  cfg.data.max_seq_length = 384
  cfg.data.doc_stride = 128
  cfg.data.max_query_length = 64
  cfg.data.max_answer_length = 30
  cfg.train.batch_size = 32
  cfg.train.epochs = 2.0
  cfg.optim.peak_learning_rate = 3e-5
  return cfg
