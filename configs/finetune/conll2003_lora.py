r"""CoNLL-2003 NER with LoRA (r=8 on query, value and the FFN's intermediate projection) over a
frozen cased BERT. NER reads every token's last hidden state: on query and value alone (peft's
default, --config.peft.target_modules=query,value) LoRA ends 2.9 F1 lower (RESULTS.md).

  python -m jaxfm.finetune --config=configs/finetune/conll2003_lora.py --workdir=runs/conll_lora \
      --config.init_from=hf:/path/to/bert-base-cased --config.data.lowercase=False \
      --config.data.train_file=conll2003/train.txt --config.data.dev_file=conll2003/valid.txt
  python -m jaxfm.convert --to_peft --from=runs/conll_lora --out=conll_adapter
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "conll2003.py")
  cfg.peft.method = "lora"
  cfg.peft.rank = 8
  cfg.peft.alpha = 16.0
  cfg.peft.target_modules = "query,value,intermediate"
  cfg.optim.peak_learning_rate = 3e-3  # adapters take larger steps than full fine-tuning
  return cfg
