r"""SST-2: a fine-tuned 6-layer teacher (e.g. all-MiniLM-L6-v2) distilled into a 3-layer
student that starts from every second teacher layer (DistilBERT), on soft targets and labels.

  python -m jaxfm.distill --config=configs/distill/sst2_minilm.py --workdir=runs/sst2_student \
      --config.teacher=runs/sst2_teacher \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_student --split=dev
"""

from jaxfm.config import distill_defaults


def get_config():
  cfg = distill_defaults()
  cfg.task = "classification"
  cfg.data.text_fields = "sentence"
  cfg.data.label_field = "label"
  cfg.data.max_seq_length = 128
  cfg.model.num_layers = 3
  cfg.distill.student_init = "every_k"
  cfg.distill.losses = "kl=0.5,task=0.5"
  cfg.distill.temperature = 2.0
  cfg.train.batch_size = 32
  cfg.train.epochs = 3.0
  cfg.optim.peak_learning_rate = 5e-5
  return cfg
