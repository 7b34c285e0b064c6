r"""MSRA NER (Chinese, PER/LOC/ORG): one `CHAR<TAB>TAG` per line, IOB2, a blank line after each
sentence; every character is one word. Dev entity F1 (seqeval's) picks the best checkpoint.

  python -m jaxfm.finetune --config=configs/finetune/msra_ner.py --workdir=runs/msra_ner \
      --config.init_from=hf:/path/to/bert-base-chinese \
      --config.data.train_file=/path/to/msra_ner/train.txt \
      --config.data.dev_file=/path/to/msra_ner/dev.txt \
      --config.data.test_file=/path/to/msra_ner/test.txt
  python -m jaxfm.evaluate --workdir=runs/msra_ner --split=test
"""

from jaxfm.config import finetune_defaults


def get_config():
  cfg = finetune_defaults()
  cfg.task = "ner"
  cfg.data.tag_column = -1  # CHAR<TAB>TAG
  cfg.data.tag_scheme = "iob2"
  cfg.data.lowercase = True  # as bert-base-chinese (for a bare vocab.txt)
  cfg.data.max_seq_length = 128  # MSRA sentences are at most 100 characters
  cfg.train.batch_size = 32
  cfg.train.epochs = 3.0
  cfg.optim.peak_learning_rate = 5e-5
  return cfg
