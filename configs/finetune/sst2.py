r"""SST-2 (GLUE) binary sentiment classification; dev accuracy picks the best checkpoint.

  python -m jaxfm.finetune --config=configs/finetune/sst2.py --workdir=runs/sst2 \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2 --split=dev
"""

from jaxfm.config import finetune_defaults


def get_config():
  cfg = finetune_defaults()
  cfg.task = "classification"
  cfg.data.text_fields = "sentence"
  cfg.data.label_field = "label"
  cfg.data.max_seq_length = 128
  cfg.train.batch_size = 32
  cfg.train.epochs = 3.0
  cfg.optim.peak_learning_rate = 2e-5
  return cfg
