r"""SST-2 with IA³: learned rescaling of keys, values and the FFN activations (peft's BERT
default targets), the classifier trained beside it.

  python -m jaxfm.finetune --config=configs/finetune/sst2_ia3.py --workdir=runs/sst2_ia3 \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2.py")
  cfg.peft.method = "ia3"
  cfg.optim.peak_learning_rate = 3e-3
  return cfg
