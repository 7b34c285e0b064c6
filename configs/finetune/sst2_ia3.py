r"""SST-2 with IA³: learned rescaling of keys, values and the FFN activations (peft's BERT
default targets), the classifier trained beside it.

  python -m jaxfm.finetune --config=configs/finetune/sst2_ia3.py --workdir=runs/sst2_ia3 \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
"""

import importlib.util
import pathlib

_BASE = pathlib.Path(__file__).with_name("sst2.py")


def get_config():
  spec = importlib.util.spec_from_file_location("sst2", _BASE)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  cfg = recipe.get_config()
  cfg.peft.method = "ia3"
  cfg.optim.peak_learning_rate = 3e-3
  return cfg
