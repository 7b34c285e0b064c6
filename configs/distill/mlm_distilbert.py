r"""Task-agnostic distillation (DistilBERT): an MLM teacher halved into a student that starts from
every second teacher layer, on pretraining's masked batches of the corpus, with DistilBERT's
loss weights (5 soft-target KL, 2 MLM, 1 cosine of the last hidden states).

  python -m jaxfm.distill --config=configs/distill/mlm_distilbert.py --workdir=runs/mlm_student \
      --config.teacher=hf:all-MiniLM-L6-v2 --config.data.train_files='corpus/*.txt'
  python -m jaxfm.finetune --config=configs/finetune/sst2.py --workdir=runs/sst2_from_student \
      --config.init_from=runs/mlm_student/student ...
"""

from jaxfm.config import distill_mlm_defaults


def get_config():
  cfg = distill_mlm_defaults()
  cfg.model.num_layers = 3
  cfg.distill.student_init = "every_k"
  cfg.data.max_seq_length = 128
  cfg.data.max_predictions_per_seq = 20
  cfg.train.steps = 10000
  cfg.train.batch_size = 32
  cfg.train.log_every = 50
  cfg.train.eval_every = 1000
  cfg.train.eval_batches = 8
  cfg.train.checkpoint_every = 1000
  cfg.optim.peak_learning_rate = 5e-4
  cfg.optim.warmup_steps = 500
  return cfg
