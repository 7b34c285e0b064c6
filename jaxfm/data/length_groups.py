"""The order of an epoch's examples: shuffled, or in fine-tuning batches of similar lengths;
and the few lengths to compile such batches at.

With `data.group_by_length` an epoch's order is still a fresh permutation per (seed, epoch), but
within each pool of `POOL_BATCHES` consecutive batches the rows are sorted by length and the
pool's batches are then shuffled: every batch holds rows of similar length (as `group_by_length`
does in Hugging Face's trainer), so cutting it to the shortest length bucket that holds its
longest row (`loader.cut_to_bucket`) leaves little padding. `data.length_buckets=auto` picks up
to `data.max_buckets` such lengths, multiples of `data.bucket_multiple`, that minimise the
tokens the run computes plus, per length, what its compile costs in the same units
(`data.compile_cost_tokens`): a short run, or one on a chip whose steps take milliseconds
while a compile takes a minute, gets fewer lengths.
"""

from __future__ import annotations

import functools

import numpy as np

POOL_BATCHES = 64  # batches whose rows are sorted together: wide enough to group, still mixed

# A compile's time as tokens of training steps, per platform (`data.compile_cost_tokens=auto`),
# from MiniLM-L6 at batch 32: on this project's 2-core CPU a train and eval compile of one length
# take ~11 s against ~4,300 tokens/s (BENCHMARKS.md, whole fine-tuning runs); on TPU v5e
# BERT-base compiles take 84-210 s (`jaxfm.aot`, BENCHMARKS.md) against ~1.6 M tokens/s at 50%
# MFU on v5e-8. Rough by design: the choice only needs the order of magnitude. Other
# platforms: unmeasured, compiles counted as free.
COMPILE_COST_TOKENS = {"cpu": 50_000, "tpu": 100_000_000}


@functools.lru_cache(maxsize=4)
def shuffled_order(num_examples: int, seed: int, shard: int, epoch: int) -> np.ndarray:
  """int64 [num_examples]: the example order of one shard's epoch."""
  return np.random.default_rng([seed, shard, epoch]).permutation(num_examples)


@functools.lru_cache(maxsize=4)
def _grouped(lengths: bytes, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  lengths_ = np.frombuffer(lengths, np.int32)
  rng = np.random.default_rng([seed, 0, epoch])
  order = rng.permutation(len(lengths_))  # [n]: shuffled_order's, then grouped
  pool = POOL_BATCHES * batch_size
  pools = []
  for start in range(0, len(order), pool):
    rows = order[start:start + pool]
    rows = rows[np.argsort(lengths_[rows], kind="stable")]
    batches = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    pools += [batches[i] for i in rng.permutation(len(batches))]
  return np.concatenate(pools)


def grouped_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> np.ndarray:
  """int64 [n]: epoch `epoch`'s order of the rows with `lengths` [n], in batches of
  `batch_size` (the global batch) of similar lengths."""
  return _grouped(np.asarray(lengths, np.int32).tobytes(), batch_size, seed, epoch)


def choose_buckets(batch_longest: np.ndarray, max_length: int, max_buckets: int,
                   multiple: int, bucket_cost: float = 0.0) -> tuple[int, ...]:
  """Up to `max_buckets` ascending lengths, multiples of `multiple` and ending with
  `max_length`, minimising the sum over batches of the shortest length that holds each batch's
  longest row (`batch_longest` [batches]) plus `bucket_cost` per length: an exact dynamic
  programme over the candidates."""
  needed = np.minimum(-(-np.asarray(batch_longest) // multiple) * multiple, max_length)
  candidates, counts = np.unique(needed, return_counts=True)  # ascending
  if candidates[-1] != max_length:  # the longest length a batch can have is always compiled
    candidates, counts = np.append(candidates, max_length), np.append(counts, 0)
  m = len(candidates)
  # cost[i, j]: tokens per row of the batches needing candidates i..j, all cut at candidate j.
  prefix = np.concatenate([[0], np.cumsum(counts)])
  cost = lambda i, j: (prefix[j + 1] - prefix[i]) * candidates[j]
  best = {(0, j): (cost(0, j), (j,)) for j in range(m)}  # (k buckets, last bucket j)
  for k in range(1, min(max_buckets, m)):
    for j in range(k, m):
      best[k, j] = min(((best[k - 1, i][0] + cost(i + 1, j), best[k - 1, i][1] + (j,))
                        for i in range(k - 1, j)), key=lambda x: x[0])
  _, chosen = min(((best[k, m - 1][0] + bucket_cost * (k + 1), best[k, m - 1][1])
                   for k in range(min(max_buckets, m))), key=lambda x: x[0])
  return tuple(int(candidates[j]) for j in chosen)


def auto_buckets(lengths: np.ndarray, batch_size: int, seed: int, grouped: bool,
                 max_length: int, max_buckets: int, multiple: int, steps: int = 0,
                 compile_cost_tokens: float = 0.0) -> tuple[int, ...]:
  """`data.length_buckets=auto`: `choose_buckets` for epoch 0's batches of rows of `lengths`,
  with a run of `steps` steps paying `compile_cost_tokens` per length."""
  longest = batch_longest(lengths, batch_size, seed, grouped)  # [batches]
  # choose_buckets counts tokens per row over one epoch's batches: the run's tokens are
  # batch_size * steps / batches times that.
  bucket_cost = compile_cost_tokens * len(longest) / (batch_size * steps) if steps else 0.0
  return choose_buckets(longest, max_length, max_buckets, multiple, bucket_cost)


def compile_cost_tokens(setting: str, platform: str) -> float:
  """`data.compile_cost_tokens`: 'auto' (the platform's `COMPILE_COST_TOKENS`, else 0) or a
  number of tokens."""
  return float(COMPILE_COST_TOKENS.get(platform, 0) if setting == "auto" else setting)


def padding_share(lengths: np.ndarray, batch_size: int, seed: int,
                  buckets: tuple[int, ...], grouped: bool) -> float:
  """Tokens computed over real tokens for epoch 0's batches cut to `buckets` (1.0: no padding)."""
  longest = batch_longest(lengths, batch_size, seed, grouped)  # [batches]
  rows = np.minimum(batch_size, len(lengths) - batch_size * np.arange(len(longest)))
  cut = np.asarray(buckets)[np.searchsorted(buckets, longest)]  # [batches]
  return float(np.sum(cut * rows)) / max(int(np.sum(lengths)), 1)


def epoch_order(lengths: np.ndarray, batch_size: int, seed: int, epoch: int,
                grouped: bool) -> np.ndarray:
  """int64 [n]: the loader's order of an epoch of one shard, grouped by length or not."""
  if grouped:
    return grouped_order(lengths, batch_size, seed, epoch)
  return shuffled_order(len(lengths), seed, 0, epoch)


def batch_longest(lengths: np.ndarray, batch_size: int, seed: int, grouped: bool) -> np.ndarray:
  """int [batches]: the longest row of each of epoch 0's batches."""
  order = epoch_order(lengths, batch_size, seed, 0, grouped)
  return np.array([lengths[order[i:i + batch_size]].max()
                   for i in range(0, len(order), batch_size)])
