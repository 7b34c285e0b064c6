r"""SST-2 with AdaLoRA on query and value: each update starts at rank 12 and is pruned by
importance to rank 8 per module on average (LoRA r=8's budget, allocated where it matters);
only the adapter and the classifier train.

  python -m jaxfm.finetune --config=configs/finetune/sst2_adalora.py --workdir=runs/sst2_adalora \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_adalora --split=dev
  python -m jaxfm.convert --to_peft --from=runs/sst2_adalora --out=sst2_adapter

The budget falls after tinit steps and is final tfinal steps before the end: about 10% and 20%
of the recipe's 3 epochs of SST-2 (6,315 steps at batch 32). A shorter run scales them with it
(tinit + tfinal < train.steps, else the run is refused), e.g. for 300 steps
`--config.peft.tinit=30 --config.peft.tfinal=60`.
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2_lora.py")
  cfg.peft.method = "adalora"
  cfg.peft.init_r = 12
  cfg.peft.target_r = 8
  cfg.peft.tinit = 600
  cfg.peft.tfinal = 1200
  cfg.peft.deltaT = 10
  cfg.peft.orth_reg_weight = 0.1  # the AdaLoRA paper's GLUE setting (peft's default is 0.5)
  # peft's start (E = 0, P and Q drawn at 0.02) moves slowly: a larger step than LoRA's.
  cfg.optim.peak_learning_rate = 5e-3
  return cfg
