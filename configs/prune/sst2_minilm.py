r"""SST-2: structured pruning of a fine-tuned all-MiniLM-L6-v2 (6 layers x 12 heads, FFN 1536):
a quarter of the attention heads and of each layer's FFN neurons, ranked by gradient x
activation (Michel et al. 2019) on 16 training batches.

  python -m jaxfm.prune --config=configs/prune/sst2_minilm.py --workdir=runs/sst2_pruned \
      --config.init_from=runs/sst2_teacher \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_pruned --split=dev
  python -m jaxfm.convert --to_hf --from=runs/sst2_pruned --out=runs/sst2_pruned_hf

With a recovery in the same command (`prune.recovery_epochs`, at `optim.peak_learning_rate` as
fine-tuning trains; `prune.recovery=distill` distils from the unpruned model instead), the
workdir holds the recovered model and runs/sst2_recovered/pruned the pruned one;
pruning.json has both dev scores, and the same command relaunched resumes:

  python -m jaxfm.prune --config=configs/prune/sst2_minilm.py --workdir=runs/sst2_recovered \
      --config.init_from=runs/sst2_teacher --config.prune.recovery_epochs=1 \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
"""

from jaxfm.config import prune_defaults


def get_config():
  cfg = prune_defaults()
  cfg.task = "classification"
  cfg.data.text_fields = "sentence"
  cfg.data.label_field = "label"
  cfg.data.max_seq_length = 128
  cfg.train.batch_size = 32
  cfg.optim.peak_learning_rate = 2e-5  # the recovery's (configs/finetune/sst2.py's)
  cfg.prune.heads_share = 0.25
  cfg.prune.ffn_share = 0.25
  cfg.prune.importance = "gradient"
  cfg.prune.batches = 16
  return cfg
