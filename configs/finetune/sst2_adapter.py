r"""SST-2 with Houlsby bottleneck adapters (after attention and after the FFN in every layer,
hidden / 16 wide); only they and the classifier train. peft has no adapters: no --to_peft.

  python -m jaxfm.finetune --config=configs/finetune/sst2_adapter.py --workdir=runs/sst2_adapter \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_adapter --split=dev
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2.py")
  cfg.peft.method = "houlsby"
  cfg.peft.reduction_factor = 16
  cfg.optim.peak_learning_rate = 1e-3
  return cfg
