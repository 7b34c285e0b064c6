r"""SST-2 with quantization-aware fine-tuning for w8a8 int8 serving: the train and eval steps
run the model as its int8 export runs it (int8 weights per output channel, int8 activations
per token, straight-through gradients), so the dev accuracy training reports is the int8
folder's.

  python -m jaxfm.finetune --config=configs/finetune/sst2_qat.py --workdir=runs/sst2_qat \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.quantize --workdir=runs/sst2_qat --out=runs/sst2_qat-int8
  python -m jaxfm.evaluate --workdir=runs/sst2_qat-int8 --split=dev
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2.py")
  cfg.quantize.qat = "w8a8"
  return cfg
