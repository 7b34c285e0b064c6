r"""Padding share of fine-tuning batches: tokens computed per real token over one epoch.

  python -m benchmarks.padding --config=configs/finetune/sst2.py \
      --config.data.train_file=../shared/data/sst2/train.tsv --config.data.tokenizer=VOCAB_TXT

Reads and converts the training split exactly as `jaxfm.finetune` does, then prints, for full
length, for `data.max_buckets` lengths chosen over batches in random order, and for batches
grouped by length (`data.group_by_length`), the lengths chosen and the padding share.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from ml_collections import config_flags

from jaxfm.data import length_groups
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.tasks import load_split

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.")


def main(argv: Sequence[str]) -> None:
  del argv
  cfg = _CONFIG.value
  data, batch = cfg.data, cfg.train.batch_size
  tokenizer = load_tokenizer(data.tokenizer, lowercase=data.lowercase)
  split, _ = load_split(cfg.task, data, data.train_file, tokenizer.backend, None,
                        data.max_train_examples)
  lengths = split.features["attention_mask"].sum(axis=1)  # [n]
  print(f"{data.train_file}: {len(lengths)} rows, {lengths.mean():.1f} tokens on average, "
        f"batch {batch}")
  rows = [("full length", (data.max_seq_length,), False)]
  for grouped in (False, True):
    buckets = length_groups.auto_buckets(lengths, batch, data.seed, grouped, data.max_seq_length,
                                         data.max_buckets, data.bucket_multiple)
    rows.append(("auto, grouped by length" if grouped else "auto", buckets, grouped))
  for name, buckets, grouped in rows:
    share = length_groups.padding_share(lengths, batch, data.seed, buckets, grouped)
    print(f"  {name:26s} buckets {','.join(map(str, buckets)):18s} padding share {share:.3f}")


if __name__ == "__main__":
  app.run(main)
