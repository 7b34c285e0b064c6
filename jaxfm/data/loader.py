"""MLM pretraining input: `build_pretraining_data`, the one entry point the trainer calls.

It reads the corpus, holds out `eval_fraction` of the documents, loads or trains the
tokenizer, packs both splits once into numpy stores, and hands out per-host iterators:

* `train_iterator`: a grain pipeline over an endless, per-epoch reshuffled global order of
  the training examples. Host `s` of `n` takes the `s`-th block of `B` rows of every global
  batch, so the global batch is the same whatever the host count (and so are the dropout
  masks its rows get), and the
  hosts together see every example exactly once per epoch. Each example is masked with
  (seed, epoch, example index), so every epoch draws new masks and a resume replays them;
  the order of each epoch is a permutation seeded with (seed, epoch). Its state is the
  number of batches consumed plus a fingerprint (data, seed, global batch size) checked on
  restore; it is the same on every host, and since the pipeline is random-access, restoring
  replays nothing and works with any `worker_count` or host count.
* `eval_batches`: one deterministic pass over this host's share of the eval examples with
  epoch-0 masks; every host yields the same number of batches, the last ones filled with
  zero-weight padding examples.

Every batch is a dict of numpy arrays with a leading per-host batch dimension B:
input_ids, token_type_ids, attention_mask int32 [B, T]; masked_positions, masked_ids
int32 [B, P]; masked_weights float32 [B, P].
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from collections.abc import Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging

from jaxfm.data.corpus import CorpusCounters, CorpusError, CorpusSpec, Document, read_documents
from jaxfm.data.pretraining import (ExampleStore, Masking, PackingStats, build_store, held_out,
                                    mask_batch, padding_example)
from jaxfm.data.tokenizer import (WordPieceTokenizer, has_tokenizer, load_tokenizer,
                                  train_tokenizer)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class _MaskBatch:
  """(epochs [B], example indices [B]) -> masked batch."""
  store: ExampleStore
  masking: Masking
  seed: int

  def __call__(self, epochs: np.ndarray, indices: np.ndarray) -> Batch:
    return mask_batch(self.store.tokens[indices], self.store.lengths[indices],
                      self.store.b_starts[indices], self.masking, seed=self.seed, epochs=epochs,
                      indices=indices)


@functools.lru_cache(maxsize=2)
def _epoch_order(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  """int64 [num_examples]: the example order of one epoch."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True, eq=False)
class _TakeRows:
  """(epochs [B], example indices [B]) -> those rows of fixed-shape feature arrays."""
  features: dict[str, np.ndarray]

  def __call__(self, epochs: np.ndarray, indices: np.ndarray) -> Batch:
    del epochs  # task features do not change between epochs
    return {k: v[indices] for k, v in self.features.items()}


@dataclasses.dataclass(frozen=True, eq=False)
class _ShardBatch:
  """Batch number -> this shard's batch; picklable for worker processes.

  Batch j of shard s holds global positions (j * shard_count + s) * B + i, i < B (a contiguous
  block of global batch j); position p is example `order(epoch)[p % n]` of epoch p // n,
  fetched by `fetch(epochs, indices)`.
  """
  fetch: Callable[[np.ndarray, np.ndarray], Batch]
  num_examples: int
  seed: int
  batch_size: int
  shard_index: int
  shard_count: int

  def __call__(self, batch_number: int) -> Batch:
    n = self.num_examples
    block = batch_number * self.shard_count + self.shard_index
    rows = block * self.batch_size + np.arange(self.batch_size)  # [B] global positions
    epochs, offsets = np.divmod(rows, n)  # [B], [B]
    indices = np.empty_like(offsets)
    for epoch in np.unique(epochs):
      here = epochs == epoch
      indices[here] = _epoch_order(n, self.seed, int(epoch))[offsets[here]]
    return self.fetch(epochs, indices)


def train_batches(store: ExampleStore, masking: Masking, *, batch_size: int, seed: int,
                  shard_index: int, shard_count: int) -> grain.MapDataset:
  """The endless, random-access sequence of this shard's masked training batches."""
  shard_batch = _ShardBatch(_MaskBatch(store, masking, seed), len(store), seed, batch_size,
                            shard_index, shard_count)
  return grain.MapDataset.range(sys.maxsize).map(shard_batch)


def feature_train_iterator(features: dict[str, np.ndarray], batch_size_per_host: int, *,
                           seed: int, shard_index: int | None = None,
                           shard_count: int | None = None) -> "TrainIterator":
  """Endless, per-epoch reshuffled batches of fixed-shape task features, sharded by host.

  The same global order and checkpointable state as pretraining's `train_iterator`.
  """
  shard_index, shard_count = _shard(shard_index, shard_count)
  num_examples = len(next(iter(features.values())))
  batches = grain.MapDataset.range(sys.maxsize).map(_ShardBatch(
      _TakeRows(features), num_examples, seed, batch_size_per_host, shard_index, shard_count))
  fingerprint = {
      "num_examples": num_examples,
      "examples_crc32": zlib.crc32(b"".join(v.tobytes() for _, v in sorted(features.items()))),
      "seed": seed,
      "global_batch_size": batch_size_per_host * shard_count,
  }
  return TrainIterator(batches, worker_count=0, fingerprint=fingerprint)


class TrainIterator(Iterator[Batch]):
  """Yields training batches; `get_state`/`set_state` checkpoint it as a JSON-able dict.

  The state is the same on every host (all hosts consume batches in lockstep), so saving
  it once is enough: with Orbax, `ocp.args.Composite(..., data=ocp.args.JsonSave(
  it.get_state()))`, then `it.set_state(restored.data)` after `ocp.args.JsonRestore()`.
  Batch j always covers global positions [j * G, (j + 1) * G) for the global batch G, so a
  state restores onto any host count and per-host batch size with the same G.
  """

  def __init__(self, batches: grain.MapDataset, *, worker_count: int,
               fingerprint: dict[str, int]):
    self._batches = batches
    self._worker_count = worker_count
    self._fingerprint = fingerprint
    self._consumed = 0
    self._iterator = None  # started lazily, so a restore never starts workers twice

  def __next__(self) -> Batch:
    if self._iterator is None:
      ds = self._batches[self._consumed:].to_iter_dataset(
          grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
      if self._worker_count:
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (e.g. under pytest)
          flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._worker_count,
                                                         per_worker_buffer_size=2))
      self._iterator = iter(ds)
    batch = next(self._iterator)
    self._consumed += 1
    return batch

  def get_state(self) -> dict[str, int]:
    return {"batches_consumed": self._consumed, **self._fingerprint}

  def set_state(self, state: dict[str, int]) -> None:
    """Continues after `state["batches_consumed"]` batches.

    Raises:
      ValueError: if the state comes from other data, seed or global batch size.
    """
    mismatched = {k: (state.get(k), v) for k, v in self._fingerprint.items() if state.get(k) != v}
    if mismatched:
      raise ValueError("data iterator state does not match this pipeline (saved, current): "
                       f"{mismatched}")
    self.close()
    self._consumed = int(state["batches_consumed"])

  def close(self) -> None:
    """Stops the background workers, if any."""
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator = None


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= index < count:
    raise ValueError(f"shard_index={index} must be in [0, shard_count={count})")
  return index, count


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainingData:
  """Tokenizer, packed train/eval stores and counters, with per-host iterators."""
  tokenizer: WordPieceTokenizer
  train: ExampleStore
  eval: ExampleStore
  masking: Masking
  seed: int
  counters: dict[str, int]

  def train_iterator(self, batch_size_per_host: int, *, seed: int | None = None,
                     shard_index: int | None = None, shard_count: int | None = None,
                     worker_count: int = 0) -> TrainIterator:
    """Endless training batches of this host; shards default to the JAX process."""
    seed = self.seed if seed is None else seed
    shard_index, shard_count = _shard(shard_index, shard_count)
    batches = train_batches(self.train, self.masking, batch_size=batch_size_per_host, seed=seed,
                            shard_index=shard_index, shard_count=shard_count)
    fingerprint = {
        "num_examples": len(self.train),
        "examples_crc32": self._train_crc32,
        "seed": seed,
        "global_batch_size": batch_size_per_host * shard_count,
    }
    return TrainIterator(batches, worker_count=worker_count, fingerprint=fingerprint)

  @functools.cached_property
  def _train_crc32(self) -> int:
    """Identifies the training examples in iterator states."""
    return zlib.crc32(self.train.tokens.tobytes())

  def num_eval_batches(self, batch_size_per_host: int, shard_count: int | None = None) -> int:
    """Batches `eval_batches` yields on every host."""
    shard_count = jax.process_count() if shard_count is None else shard_count
    per_host = -(-len(self.eval) // shard_count)
    return -(-per_host // batch_size_per_host)

  def eval_batches(self, batch_size_per_host: int, *, shard_index: int | None = None,
                   shard_count: int | None = None) -> Iterator[Batch]:
    """One pass over this host's eval examples (fixed masks), padded with zero weights."""
    shard_index, shard_count = _shard(shard_index, shard_count)
    mask = _MaskBatch(self.eval, self.masking, self.seed)
    padding = padding_example(self.eval.max_seq_length, self.masking.max_predictions,
                              self.tokenizer.special_ids)
    mine = range(shard_index, len(self.eval), shard_count)
    for b in range(self.num_eval_batches(batch_size_per_host, shard_count)):
      indices = np.array(mine[b * batch_size_per_host:(b + 1) * batch_size_per_host], np.int64)
      batch = mask(np.zeros_like(indices), indices)
      fill = batch_size_per_host - len(indices)
      yield {k: np.concatenate([v, np.repeat(padding[k][None], fill, axis=0)])
             for k, v in batch.items()}


def _tokenizer(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None,
               train_docs: list[Document], save: bool) -> WordPieceTokenizer:
  """The configured tokenizer, else the run's saved one, else one trained on `train_docs`."""
  if data_cfg.tokenizer:
    tokenizer = load_tokenizer(data_cfg.tokenizer, lowercase=data_cfg.lowercase)
  elif tokenizer_dir and has_tokenizer(tokenizer_dir):
    logging.info("Loading the run's tokenizer from %s", tokenizer_dir)
    return load_tokenizer(tokenizer_dir, lowercase=data_cfg.lowercase)
  else:
    logging.info("Training a WordPiece vocabulary of %d on %d documents", data_cfg.vocab_size,
                 len(train_docs))
    tokenizer = train_tokenizer([s for doc in train_docs for s in doc],
                                vocab_size=data_cfg.vocab_size, lowercase=data_cfg.lowercase)
  if tokenizer_dir and save and not has_tokenizer(tokenizer_dir):
    tokenizer.save(tokenizer_dir)
  return tokenizer


def build_pretraining_data(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None, *,
                           max_position_embeddings: int,
                           save_tokenizer: bool | None = None) -> PretrainingData:
  """Reads, splits, tokenises and packs the corpus of `cfg.data`.

  Args:
    data_cfg: the `cfg.data` section (see `jaxfm.config.pretrain_defaults`).
    tokenizer_dir: the run's tokenizer folder (e.g. `workdir/tokenizer`). With
      `data_cfg.tokenizer == ''` a tokenizer saved there is reused, else one is trained on the
      training documents and saved there; a configured tokenizer is copied there once.
    max_position_embeddings: the model's limit on `max_seq_length`.
    save_tokenizer: whether this process writes `tokenizer_dir`; default: JAX process 0
      (training is deterministic, so the other hosts get the same vocabulary).

  Raises:
    CorpusError: unreadable input, or no training example.
    TokenizerError: a configured tokenizer cannot be loaded.
    ValueError: `max_seq_length` exceeds `max_position_embeddings`.
  """
  if data_cfg.max_seq_length > max_position_embeddings:
    raise ValueError(f"data.max_seq_length={data_cfg.max_seq_length} exceeds "
                     f"model.max_position_embeddings={max_position_embeddings}")
  save = jax.process_index() == 0 if save_tokenizer is None else save_tokenizer
  corpus = CorpusCounters()
  docs = list(read_documents(CorpusSpec.from_config(data_cfg), corpus))
  is_eval = held_out(len(docs), data_cfg.eval_fraction, data_cfg.seed)  # [docs]
  train_docs = [d for d, e in zip(docs, is_eval) if not e]
  eval_docs = [d for d, e in zip(docs, is_eval) if e]
  tokenizer = _tokenizer(data_cfg, tokenizer_dir, train_docs, save)
  stats = {"train": PackingStats(), "eval": PackingStats()}
  stores = {
      split: build_store(split_docs, tokenizer, data_cfg.max_seq_length,
                         np.random.default_rng([data_cfg.seed, i]), stats[split])
      for i, (split, split_docs) in enumerate((("train", train_docs), ("eval", eval_docs)))
  }
  if not len(stores["train"]):
    raise CorpusError(f"no training example in the corpus ({corpus.as_dict()})")
  counters = {f"corpus/{k}": v for k, v in corpus.as_dict().items()}
  for split, split_stats in stats.items():
    counters.update({f"{split}/{k}": v for k, v in split_stats.as_dict().items()})
  counters["tokenizer/vocab_size"] = tokenizer.vocab_size
  logging.info("Pretraining data: %s", counters)
  masking = Masking.for_tokenizer(tokenizer, max_predictions=data_cfg.max_predictions_per_seq,
                                  mask_prob=data_cfg.mask_prob,
                                  whole_word=data_cfg.whole_word_masking)
  return PretrainingData(tokenizer, stores["train"], stores["eval"], masking, data_cfg.seed,
                         counters)
