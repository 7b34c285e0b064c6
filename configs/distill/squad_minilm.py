r"""SQuAD v1.1: a fine-tuned 6-layer teacher distilled into a 3-layer student from every second
teacher layer (DistilBERT's SQuAD recipe: KL of the start and end distributions at T=2 and the
span loss, half each).

  python -m jaxfm.distill --config=configs/distill/squad_minilm.py --workdir=runs/squad_student \
      --config.teacher=runs/squad_teacher \
      --config.data.train_file=train-v1.1.json --config.data.dev_file=dev-v1.1.json
  python -m jaxfm.evaluate --workdir=runs/squad_student --split=dev
"""

from jaxfm.config import distill_defaults


def get_config():
  cfg = distill_defaults()
  cfg.task = "qa"
  cfg.data.max_seq_length = 384
  cfg.data.doc_stride = 128
  cfg.data.max_query_length = 64
  cfg.data.max_answer_length = 30
  cfg.model.num_layers = 3
  cfg.distill.student_init = "every_k"
  cfg.distill.losses = "kl=0.5,task=0.5"
  cfg.distill.temperature = 2.0
  cfg.train.batch_size = 32
  cfg.train.epochs = 2.0
  cfg.optim.peak_learning_rate = 5e-5
  return cfg
