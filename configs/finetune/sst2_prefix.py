r"""SST-2 with prefix tuning (P-tuning v2): 20 trainable key/value prefixes in every layer,
trained directly as peft's default does (`peft.prefix_projection=True` reparameterises them
through peft's MLP, which needs its own learning rate); only they and the classifier train.
Exports with
`python -m jaxfm.convert --to_peft --from=runs/sst2_prefix --out=DIR` (peft's PREFIX_TUNING).

  python -m jaxfm.finetune --config=configs/finetune/sst2_prefix.py --workdir=runs/sst2_prefix \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_prefix --split=dev
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2.py")
  cfg.peft.method = "prefix"
  cfg.peft.num_virtual_tokens = 20
  cfg.peft.prefix_projection = False
  cfg.optim.peak_learning_rate = 1e-2  # prefixes train with far larger steps than weights
  return cfg
