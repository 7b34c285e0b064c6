r"""Padding share of fine-tuning batches: tokens computed per real token over one epoch.

  python -m benchmarks.padding --config=configs/finetune/sst2.py \
      --config.data.train_file=../shared/data/sst2/train.tsv --config.data.tokenizer=VOCAB_TXT

Reads and converts the training split exactly as `jaxfm.finetune` does, then prints, for full
length, for `data.max_buckets` lengths chosen over batches in random order, for batches
grouped by length (`data.group_by_length`), and for rows packed with several examples each
(`data.packing`, at `data.max_examples_per_row` and at a few other caps), the lengths chosen
and the padding share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from absl import app
from ml_collections import config_flags

from jaxfm.data import length_groups
from jaxfm.data.packing import Packing
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.tasks import load_split

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.")


def main(argv: Sequence[str]) -> None:
  del argv
  cfg = _CONFIG.value
  data, batch = cfg.data, cfg.train.batch_size
  tokenizer = load_tokenizer(data.tokenizer, lowercase=data.lowercase)
  with cfg.unlocked():
    data.packing = False
  split, _ = load_split(cfg.task, data, data.train_file, tokenizer.backend, None,
                        data.max_train_examples)
  lengths = split.row_lengths()  # [n]
  print(f"{data.train_file}: {len(lengths)} rows, {lengths.mean():.1f} tokens on average, "
        f"batch {batch}")
  rows = [("full length", lengths, (data.max_seq_length,), False)]
  for grouped in (False, True):
    rows.append(("auto, grouped by length" if grouped else "auto", lengths,
                 _auto(data, lengths, batch, grouped), grouped))
  caps = sorted({data.max_examples_per_row, 8, 16, 32} & set(range(1, data.max_seq_length // 2 + 1)))
  for cap in caps:
    packed = dataclasses.replace(split, packing=Packing(data.max_seq_length, cap)).row_lengths()
    rows.append((f"packed, <= {cap} per row ({len(lengths) / len(packed):.1f} avg)", packed,
                 _auto(data, packed, batch, False), False))
  for name, row_lengths, buckets, grouped in rows:
    share = length_groups.padding_share(row_lengths, batch, data.seed, buckets, grouped)
    print(f"  {name:34s} buckets {','.join(map(str, buckets)):18s} padding share {share:.3f}")


def _auto(data, lengths: np.ndarray, batch: int, grouped: bool) -> tuple[int, ...]:
  return length_groups.auto_buckets(lengths, batch, data.seed, grouped, data.max_seq_length,
                                    data.max_buckets, data.bucket_multiple)


if __name__ == "__main__":
  app.run(main)
