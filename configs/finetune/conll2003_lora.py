r"""CoNLL-2003 NER with LoRA (r=8 on query and value) over a frozen cased BERT.

  python -m jaxfm.finetune --config=configs/finetune/conll2003_lora.py --workdir=runs/conll_lora \
      --config.init_from=hf:/path/to/bert-base-cased --config.data.lowercase=False \
      --config.data.train_file=conll2003/train.txt --config.data.dev_file=conll2003/valid.txt
  python -m jaxfm.convert --to_peft --from=runs/conll_lora --out=conll_adapter
"""

import importlib.util
import pathlib

_BASE = pathlib.Path(__file__).with_name("conll2003.py")


def get_config():
  spec = importlib.util.spec_from_file_location("conll2003", _BASE)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  cfg = recipe.get_config()
  cfg.peft.method = "lora"
  cfg.peft.rank = 8
  cfg.peft.alpha = 16.0
  cfg.peft.target_modules = "query,value"
  cfg.optim.peak_learning_rate = 1e-3
  return cfg
