r"""CoNLL-2003 English NER (IOB2 tags in the last column); dev entity F1 picks the best checkpoint.

  python -m jaxfm.finetune --config=configs/finetune/conll2003.py --workdir=runs/conll \
      --config.init_from=hf:/path/to/bert-base-cased --config.data.lowercase=False \
      --config.data.train_file=conll2003/train.txt --config.data.dev_file=conll2003/valid.txt
  python -m jaxfm.evaluate --workdir=runs/conll --split=dev
"""

from jaxfm.config import finetune_defaults


def get_config():
  cfg = finetune_defaults()
  cfg.task = "ner"
  cfg.data.tag_column = -1
  cfg.data.tag_scheme = "iob2"
  cfg.data.max_seq_length = 128
  cfg.train.batch_size = 32
  cfg.train.epochs = 3.0
  cfg.optim.peak_learning_rate = 5e-5
  return cfg
