r"""SST-2: a fine-tuned teacher (e.g. all-MiniLM-L6-v2) distilled into a randomly initialised
student of bert-mini's shape (4 layers, hidden 256, 4 heads, FFN 1,024) with the teacher's
vocabulary, on soft targets and labels. A random student needs a larger learning rate than one
started from teacher layers (`sst2_minilm.py`).

  python -m jaxfm.distill --config=configs/distill/sst2_bert_mini.py --workdir=runs/sst2_mini \
      --config.teacher=runs/sst2_teacher \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
"""

from jaxfm.config import distill_defaults


def get_config():
  cfg = distill_defaults()
  cfg.task = "classification"
  cfg.data.text_fields = "sentence"
  cfg.data.label_field = "label"
  cfg.data.max_seq_length = 128
  cfg.distill.student_init = "random"
  cfg.model.num_layers = 4
  cfg.model.hidden_size = 256
  cfg.model.num_heads = 4
  cfg.model.intermediate_size = 1024
  cfg.distill.losses = "kl=0.5,task=0.5"
  cfg.distill.temperature = 2.0
  cfg.train.batch_size = 32
  cfg.train.epochs = 3.0
  cfg.optim.peak_learning_rate = 5e-4
  return cfg
