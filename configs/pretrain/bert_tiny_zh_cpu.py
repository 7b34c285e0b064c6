r"""BERT-tiny (L2/H128) MLM on Chinese text: bert_tiny_cpu.py's recipe on a Chinese corpus.

The WordPiece vocabulary is trained on the corpus; CJK characters are split one per word as
bert-base-chinese does (lowercased), and the trainer keeps up to vocab_size // 2 characters.
Each line is a document (e.g. one paragraph of a news corpus); spaces between words do not
change the tokens of CJK text.

  python -m jaxfm.pretrain --config=configs/pretrain/bert_tiny_zh_cpu.py --workdir=runs/tiny_zh \
      --config.data.train_files=/path/to/chinese_corpus.txt
"""

import importlib.util
import pathlib

_BASE = pathlib.Path(__file__).with_name("bert_tiny_cpu.py")


def get_config():
  spec = importlib.util.spec_from_file_location("bert_tiny_cpu", _BASE)
  base = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(base)
  cfg = base.get_config()
  cfg.data.documents = "line"
  cfg.data.lowercase = True  # bert-base-chinese is uncased
  return cfg
