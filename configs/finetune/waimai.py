r"""waimai_10k (Chinese food-delivery reviews) binary sentiment from TSV with the header
`sentence<TAB>label` (1 positive, 0 negative); dev accuracy picks the best checkpoint.

  python -m jaxfm.finetune --config=configs/finetune/waimai.py --workdir=runs/waimai \
      --config.init_from=hf:/path/to/bert-base-chinese \
      --config.data.train_file=/path/to/waimai_10k/train.tsv \
      --config.data.dev_file=/path/to/waimai_10k/dev.tsv \
      --config.data.test_file=/path/to/waimai_10k/test.tsv
  python -m jaxfm.evaluate --workdir=runs/waimai --split=test
"""

from jaxfm.config import finetune_defaults


def get_config():
  cfg = finetune_defaults()
  cfg.task = "classification"
  cfg.data.has_header = True
  cfg.data.text_fields = "sentence"
  cfg.data.label_field = "label"
  cfg.data.lowercase = True  # as bert-base-chinese (for a bare vocab.txt)
  cfg.data.max_seq_length = 128  # reviews average 25 characters
  cfg.train.batch_size = 32
  cfg.train.epochs = 3.0
  cfg.optim.peak_learning_rate = 2e-5
  return cfg
