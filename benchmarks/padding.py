r"""Padding share of fine-tuning batches: tokens computed per real token over one epoch.

  python -m benchmarks.padding --config=configs/finetune/sst2.py \
      --config.data.train_file=../shared/data/sst2/train.tsv --config.data.tokenizer=VOCAB_TXT

Reads and converts the training split exactly as `jaxfm.finetune` does, then prints, for full
length, for `data.max_buckets` lengths chosen over batches in random order, for batches
grouped by length (`data.group_by_length`), and for rows packed with several examples each
(`data.packing`, at `data.max_examples_per_row` and at a few other caps), the lengths chosen
and the padding share.

With `--time_steps=N` it also runs the train step (the config's model, random weights, dropout
as configured) on N batches of the unpacked `auto` plan and of the packed plan, each shape
compiled before the clock starts, and prints real tokens per second: the step time at equal
real tokens. For the MiniLM-L6 shape add `--config.model.num_layers=6
--config.model.hidden_size=384 --config.model.num_heads=12 --config.model.intermediate_size=1536
--config.model.vocab_size=30522`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm.data import length_groups, loader
from jaxfm.data.packing import Packing
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.tasks import TaskSplit, load_split, make_task
from jaxfm.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Fine-tuning config file.")
_TIME_STEPS = flags.DEFINE_integer("time_steps", 0, "Train steps to time per plan (0: none).")


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
  caps = sorted(c for c in {data.max_examples_per_row, 8, 16, 32}
                if c <= data.max_seq_length // 2)
  for cap in caps:
    packed = dataclasses.replace(split, packing=Packing(data.max_seq_length, cap)).row_lengths()
    rows.append((f"packed, <= {cap} per row ({len(lengths) / len(packed):.1f} avg)", packed,
                 _auto(data, packed, batch, False), False))
  for name, row_lengths, buckets, grouped in rows:
    share = length_groups.padding_share(row_lengths, batch, data.seed, buckets, grouped)
    print(f"  {name:34s} buckets {','.join(map(str, buckets)):18s} padding share {share:.3f}")
  if _TIME_STEPS.value:
    packed = dataclasses.replace(split, packing=Packing(data.max_seq_length,
                                                        data.max_examples_per_row))
    for name, plan, buckets in (("auto", split, rows[1][2]), ("packed", packed, rows[-1][2])):
      seconds, tokens, shapes = _time_steps(cfg, plan, buckets, _TIME_STEPS.value)
      steps = _TIME_STEPS.value
      print(f"  {name:8s} {steps} steps {seconds:.2f} s ({seconds / steps:.3f} s/step, "
            f"lengths {shapes}): {tokens / seconds:,.0f} real tokens/s")


def _time_steps(cfg, split: TaskSplit, buckets: tuple[int, ...],
                steps: int) -> tuple[float, int, list[int]]:
  """(seconds, real tokens, lengths compiled) of `steps` train steps on `split`'s batches."""
  with cfg.unlocked():
    cfg.data.packing = split.packing is not None
    cfg.train.steps = steps
  task = make_task(cfg.task, config_lib.bert_config(cfg, jax.devices()[0].platform),
                   ["0", "1"] if cfg.task == "classification" else
                   [f"L{i}" for i in range(9)], None, cfg.data)
  mesh = loop.make_mesh(cfg)
  built = loop.build_steps(cfg, task, mesh)
  state = jax.jit(built.init_state, out_shardings=built.state_shardings)(jax.random.key(0))
  batches = loader.feature_train_iterator(split.device_arrays(), loader.HostLayout(
      cfg.train.batch_size), seed=cfg.data.seed, length_buckets=buckets)
  local = [next(batches) for _ in range(steps)]
  compiled = {}
  with sharding.activation_sharding(mesh):
    for batch in local:  # compile (and warm up) every shape first
      shape = batch["input_ids"].shape
      if shape not in compiled:
        compiled[shape] = loop.compile_train_step(built, sharding.global_batch(batch, mesh),
                                                  mesh)[0]
        state, metrics = compiled[shape](state, sharding.global_batch(batch, mesh))
    jax.block_until_ready(state)
    start = time.perf_counter()
    for batch in local:
      state, metrics = compiled[batch["input_ids"].shape](state, sharding.global_batch(batch, mesh))
    jax.block_until_ready((state, metrics))
  seconds = time.perf_counter() - start
  tokens = int(sum(b["attention_mask"].sum() for b in local))
  return seconds, tokens, sorted({s[1] for s in compiled})


def _auto(data, lengths: np.ndarray, batch: int, grouped: bool) -> tuple[int, ...]:
  return length_groups.auto_buckets(lengths, batch, data.seed, grouped, data.max_seq_length,
                                    data.max_buckets, data.bucket_multiple)


if __name__ == "__main__":
  app.run(main)
