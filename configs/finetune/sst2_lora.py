r"""SST-2 with LoRA (r=8 on query and value): only the adapter, the base's pooler and the
classifier train, and the checkpoints hold only them (the base is named by path and sha256 in
config.json). The pooler is what the classifier reads; frozen (peft's default,
--config.peft.modules_to_save=) LoRA ends 1.8 points lower on SST-2 (RESULTS.md).

  python -m jaxfm.finetune --config=configs/finetune/sst2_lora.py --workdir=runs/sst2_lora \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_lora --split=dev
  python -m jaxfm.convert --to_peft --from=runs/sst2_lora --out=sst2_adapter
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2.py")
  cfg.peft.method = "lora"
  cfg.peft.rank = 8
  cfg.peft.alpha = 16.0
  cfg.peft.target_modules = "query,value"
  cfg.peft.modules_to_save = "pooler"
  cfg.optim.peak_learning_rate = 2e-3  # adapters take larger steps than full fine-tuning
  return cfg
