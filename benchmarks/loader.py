"""Loader throughput alone (no model): examples/s of the MLM train iterator.

  python benchmarks/loader.py [--batch_size=32] [--max_seq_length=128] [--worker_count=0]

Builds the pretraining data of the embedded default corpus (timed separately), then
times `--batches` batches after `--warmup` ones; prints wall-clock and main-process CPU rates.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence

from absl import app, flags

from jaxfm.config import pretrain_defaults
from jaxfm.data.loader import HostLayout
from jaxfm.data.mlm_data import build_pretraining_data

_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Per-host batch size.")
_MAX_SEQ_LENGTH = flags.DEFINE_integer("max_seq_length", 128, "Sequence length.")
_WORKER_COUNT = flags.DEFINE_integer("worker_count", 0, "Loader worker processes.")
_WHOLE_WORD = flags.DEFINE_bool("whole_word_masking", False, "Whole-word masking.")
_BATCHES = flags.DEFINE_integer("batches", 500, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed batches first.")


def main(argv: Sequence[str]) -> None:
  del argv
  cfg = pretrain_defaults().data
  cfg.max_seq_length = _MAX_SEQ_LENGTH.value
  cfg.whole_word_masking = _WHOLE_WORD.value
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as folder:
    data = build_pretraining_data(cfg, folder, max_position_embeddings=512)
  print(f"build: {time.perf_counter() - start:.1f} s, {len(data.train)} train / "
        f"{len(data.eval)} eval examples, vocab {data.tokenizer.vocab_size}")
  it = data.train_iterator(HostLayout(_BATCH_SIZE.value),
                           worker_count=_WORKER_COUNT.value)
  try:
    for _ in range(_WARMUP.value):
      next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(_BATCHES.value):
      next(it)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  finally:
    it.close()
  examples = _BATCHES.value * _BATCH_SIZE.value
  print(f"loader: {examples / wall:,.0f} examples/s wall, {examples / cpu:,.0f} examples/s per "
        f"main-process CPU second (batch {_BATCH_SIZE.value}, T={_MAX_SEQ_LENGTH.value}, "
        f"workers {_WORKER_COUNT.value}, whole_word={_WHOLE_WORD.value})")


if __name__ == "__main__":
  app.run(main)
