"""MLM pretraining input: `build_pretraining_data` reads, tokenises and packs the corpus in
memory (the online path); `jaxfm.data.prepared` reads the same examples, packed once by
`jaxfm.prepare`, from disk. Both give an `MlmData`, whose iterators are below.

The corpus is split into `data.num_shards` shards (whole files when there are enough, else
every S-th document; `corpus.read_shards`), laid over the global batch as `loader.HostLayout`
says: a host reads, tokenises and packs only the shards its rows come from. Each shard holds
out `eval_fraction` of its documents; the tokenizer, unless configured, is trained on shard 0
(by the hosts that read it; the others load what process 0 saved).

* `train_iterator`: `loader.TrainIterator` over an endless stream per shard; each example is
  masked with (seed, epoch, example id), so every epoch draws new masks and a resume replays
  them.
* `eval_batches`: one deterministic pass over this host's share of its shards' eval
  examples with epoch-0 masks; every host yields the same number of batches, the last ones
  filled with zero-weight padding examples.

Batches: input_ids, token_type_ids, attention_mask int32 [B, T]; masked_positions, masked_ids
int32 [B, P]; masked_weights float32 [B, P].
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from collections.abc import Collection, Iterator, Sequence
from typing import Protocol

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxfm.data.corpus import CorpusCounters, CorpusError, CorpusSpec, Document, read_shards
from jaxfm.data.loader import (Batch, HostBatch, HostLayout, TrainIterator, num_padded_batches,
                               padded_eval_windows)
from jaxfm.data.pretraining import (ExampleStore, Masking, PackingStats, build_store,
                                    example_ids, held_out, mask_batch, padding_example)
from jaxfm.data.tokenizer import (WordPieceTokenizer, has_tokenizer, load_tokenizer,
                                  train_tokenizer)


class ExampleRows(Protocol):
  """(shards [B], indices in the shard [B]) -> those packed examples; picklable, so grain's
  workers can take it (a prepared corpus's rows open their files by path)."""

  def __call__(self, shards: np.ndarray, indices: np.ndarray) -> ExampleStore: ...


@dataclasses.dataclass(frozen=True, eq=False)
class StoreRows:
  """`ExampleRows` of the shards held in memory, back to back in one store."""
  store: ExampleStore
  starts: dict[int, int]  # shard -> its first row in `store`

  def __call__(self, shards: np.ndarray, indices: np.ndarray) -> ExampleStore:
    rows = np.array([self.starts[v] for v in shards.tolist()], np.int64) + indices  # [B]
    return ExampleStore(self.store.tokens[rows], self.store.lengths[rows],
                        self.store.b_starts[rows])


@dataclasses.dataclass(frozen=True, eq=False)
class _MaskBatch:
  """(shards [B], epochs [B], indices in the shard [B]) -> masked batch."""
  rows: ExampleRows
  masking: Masking
  seed: int

  def __call__(self, shards: np.ndarray, epochs: np.ndarray, indices: np.ndarray) -> Batch:
    examples = self.rows(shards, indices)
    return mask_batch(examples.tokens, examples.lengths, examples.b_starts, self.masking,
                      seed=self.seed, epochs=epochs, indices=example_ids(shards, indices))


def _all_processes_max(table: np.ndarray) -> np.ndarray:
  """The elementwise max of `table` (int32) over the JAX processes (a collective)."""
  if jax.process_count() == 1:
    return table
  return np.asarray(multihost_utils.process_allgather(table)).max(axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class MlmData:
  """Tokenizer, masking, counters and the iterators over the examples of the shards read here;
  `PretrainingData` holds them in memory, `prepared.PreparedData` reads them from disk.

  `shard_table` int32 [S, 3] describes every shard of the corpus (training examples, eval
  examples, crc32 of its training tokens; -1 where no host read it), the same on every host.
  """
  tokenizer: WordPieceTokenizer
  shard_table: np.ndarray
  max_seq_length: int  # T
  masking: Masking
  seed: int
  counters: dict[str, int]

  @property
  def shards_here(self) -> Collection[int]:
    """The shards whose examples this process can read."""
    raise NotImplementedError

  def rows(self, split: str) -> ExampleRows:
    """The examples of split 'train' or 'eval'."""
    raise NotImplementedError

  @property
  def num_shards(self) -> int:
    return len(self.shard_table)

  def _check(self, layout: HostLayout) -> None:
    if layout.num_shards != self.num_shards:
      raise ValueError(f"layout has {layout.num_shards} shards, the data {self.num_shards}")
    if missing := [v for v in layout.shards if v not in self.shards_here]:
      raise ValueError(f"host {layout.host} needs shards {missing}, which were not read here")

  def train_iterator(self, layout: HostLayout, *, seed: int | None = None,
                     worker_count: int = 0) -> TrainIterator:
    """Endless training batches of the host `layout` describes."""
    self._check(layout)
    seed = self.seed if seed is None else seed
    sizes = tuple(int(n) if v in self.shards_here else 0
                  for v, n in enumerate(self.shard_table[:, 0]))
    fetch = _MaskBatch(self.rows("train"), self.masking, seed)
    batches = grain.MapDataset.range(sys.maxsize).map(HostBatch(fetch, sizes, seed, layout))
    fingerprint = {
        "num_examples": int(self.shard_table[:, 0].sum()),
        "examples_crc32": zlib.crc32(self.shard_table[:, [0, 2]].tobytes()),
        "num_shards": self.num_shards,
        "seed": seed,
        "global_batch_size": layout.global_batch_size,
    }
    return TrainIterator(batches, worker_count=worker_count, fingerprint=fingerprint)

  def _eval_shares(self, layout: HostLayout) -> list[tuple[int, range]]:
    """(shard, indices of its eval examples) that the host `layout` evaluates."""
    return [(v, layout.eval_indices(v, int(self.shard_table[v, 1]))) for v in layout.shards]

  def _eval_share_sizes(self, layout: HostLayout) -> list[int]:
    """Eval examples per host."""
    return [sum(len(share) for _, share in self._eval_shares(dataclasses.replace(layout, host=h)))
            for h in range(layout.hosts)]

  def num_eval_batches(self, layout: HostLayout) -> int:
    """Batches `eval_batches` yields on every host: enough for the busiest host."""
    return num_padded_batches(self._eval_share_sizes(layout), layout.batch_size)

  def eval_batches(self, layout: HostLayout) -> Iterator[Batch]:
    """One pass over this host's share of the eval examples of its shards (fixed masks),
    padded with zero-weight examples to `num_eval_batches` batches."""
    self._check(layout)
    shares = self._eval_shares(layout)
    shards = np.concatenate([np.full(len(r), v, np.int64) for v, r in shares])  # [E]
    indices = np.concatenate([np.asarray(r, np.int64) for _, r in shares])  # [E]
    mask = _MaskBatch(self.rows("eval"), self.masking, self.seed)
    padding = padding_example(self.max_seq_length, self.masking.max_predictions,
                              self.tokenizer.special_ids)
    for here, fill in padded_eval_windows(self._eval_share_sizes(layout), layout.host,
                                          layout.batch_size):
      batch = mask(shards[here], np.zeros_like(indices[here]), indices[here])
      yield {k: np.concatenate([v, np.repeat(padding[k][None], fill, axis=0)])
             for k, v in batch.items()}



@dataclasses.dataclass(frozen=True, eq=False)
class PretrainingData(MlmData):
  """`MlmData` of packed train/eval stores of the shards read here, back to back
  (`train_starts`/`eval_starts`: each shard's first row)."""
  train: ExampleStore
  eval: ExampleStore
  train_starts: dict[int, int]
  eval_starts: dict[int, int]

  @property
  def shards_here(self) -> Collection[int]:
    return self.train_starts.keys()

  def rows(self, split: str) -> ExampleRows:
    return StoreRows(getattr(self, split), getattr(self, f"{split}_starts"))


def run_tokenizer(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None,
               shard0_train_docs: list[Document] | None, save: bool) -> WordPieceTokenizer:
  """The configured tokenizer, else the run's saved one, else one trained on shard 0.

  Training is deterministic, so every host that read shard 0 trains the same vocabulary; with
  several processes the others wait for process 0 to save it to `tokenizer_dir` (which all
  hosts share, like the checkpoints) and load it from there.
  """
  if data_cfg.tokenizer:
    tokenizer = load_tokenizer(data_cfg.tokenizer, lowercase=data_cfg.lowercase)
    if tokenizer_dir and save and not has_tokenizer(tokenizer_dir):
      tokenizer.save(tokenizer_dir)
    return tokenizer
  synced = jax.process_count() > 1
  saved = bool(tokenizer_dir) and has_tokenizer(tokenizer_dir)
  if synced:  # every host has looked before anyone writes
    multihost_utils.sync_global_devices("jaxfm: tokenizer checked")
  tokenizer = None
  if saved:
    logging.info("Loading the run's tokenizer from %s", tokenizer_dir)
    tokenizer = load_tokenizer(tokenizer_dir, lowercase=data_cfg.lowercase)
  elif shard0_train_docs is not None:
    logging.info("Training a WordPiece vocabulary of %d on the %d documents of shard 0",
                 data_cfg.vocab_size, len(shard0_train_docs))
    tokenizer = train_tokenizer([s for doc in shard0_train_docs for s in doc],
                                vocab_size=data_cfg.vocab_size, lowercase=data_cfg.lowercase)
    if tokenizer_dir and save:
      tokenizer.save(tokenizer_dir)
  if synced and not saved:
    multihost_utils.sync_global_devices("jaxfm: tokenizer saved")
  if tokenizer is None:
    if not (tokenizer_dir and has_tokenizer(tokenizer_dir)):
      raise CorpusError(f"no tokenizer in {tokenizer_dir!r}: this host did not read shard 0, so "
                        "it loads the vocabulary process 0 trains; hosts must share the workdir")
    tokenizer = load_tokenizer(tokenizer_dir, lowercase=data_cfg.lowercase)
  return tokenizer


SPLITS = ("train", "eval")  # in this order: a split's index seeds its packing


def read_splits(data_cfg: ml_collections.ConfigDict, shards: Sequence[int],
                corpus: CorpusCounters) -> dict[str, dict[int, list[Document]]]:
  """split -> shard -> documents: the shards `shards` of the corpus, each holding out
  `eval_fraction` of its documents (by a hash of seed, shard and position)."""
  docs = read_shards(CorpusSpec.from_config(data_cfg), corpus, data_cfg.num_shards, shards)
  splits = {split: {} for split in SPLITS}
  for v, shard_docs in docs.items():
    is_eval = held_out(len(shard_docs), data_cfg.eval_fraction, data_cfg.seed, v)  # [docs]
    splits["train"][v] = [d for d, e in zip(shard_docs, is_eval) if not e]
    splits["eval"][v] = [d for d, e in zip(shard_docs, is_eval) if e]
  return splits


def pack_splits(splits: dict[str, dict[int, list[Document]]], tokenizer: WordPieceTokenizer,
                data_cfg: ml_collections.ConfigDict, stats: dict[str, PackingStats],
                corpus: CorpusCounters) -> dict[str, dict[int, ExampleStore]]:
  """split -> shard -> its documents tokenised and packed (rng seeded per split and shard).

  Raises:
    CorpusError: a shard without training examples.
  """
  packed = {split: {v: build_store(shard_docs, tokenizer, data_cfg.max_seq_length,
                                   np.random.default_rng([data_cfg.seed, i, v]), stats[split])
                    for v, shard_docs in splits[split].items()}
            for i, split in enumerate(SPLITS)}
  if empty := [v for v, store in packed["train"].items() if not len(store)]:
    raise CorpusError(f"no training example in corpus shard(s) {empty} of data.num_shards="
                      f"{data_cfg.num_shards} ({corpus.as_dict()}); use fewer shards")
  return packed


def tokens_crc32(store: ExampleStore) -> int:
  """The crc32 of a shard's training tokens (as int32) that `shard_table` and the iterator's
  fingerprint carry."""
  return zlib.crc32(np.ascontiguousarray(store.tokens, np.int32).tobytes()) & 0x7FFFFFFF


def masking_of(tokenizer: WordPieceTokenizer, data_cfg: ml_collections.ConfigDict) -> Masking:
  """The masking `cfg.data` asks for."""
  return Masking.for_tokenizer(tokenizer, max_predictions=data_cfg.max_predictions_per_seq,
                               mask_prob=data_cfg.mask_prob,
                               whole_word=data_cfg.whole_word_masking)


def _shard_table(packed: dict[str, dict[int, ExampleStore]], num_shards: int) -> np.ndarray:
  """int32 [S, (train, eval, crc32 of the training tokens)] of every shard of the corpus, the
  same on every host (-1 where no host read a shard)."""
  table = np.full((num_shards, 3), -1, np.int32)
  for v, store in packed["train"].items():
    table[v] = len(store), len(packed["eval"][v]), tokens_crc32(store)
  return _all_processes_max(table) if num_shards > 1 else table


def build_pretraining_data(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None, *,
                           max_position_embeddings: int, shards: Sequence[int] | None = None,
                           save_tokenizer: bool | None = None) -> PretrainingData:
  """Reads, splits, tokenises and packs the shards `shards` of the corpus of `cfg.data`.

  The corpus is split into `data_cfg.num_shards` shards (see `corpus.read_shards`); each
  shard holds out `eval_fraction` of its documents. With several JAX processes, every
  process must call this (it exchanges the shards' sizes, and may wait for the tokenizer).

  Args:
    data_cfg: the `cfg.data` section (see `jaxfm.config.pretrain_defaults`).
    tokenizer_dir: the run's tokenizer folder (e.g. `workdir/tokenizer`). With
      `data_cfg.tokenizer == ''` a tokenizer saved there is reused, else one is trained on the
      training documents of shard 0 and saved there; a configured tokenizer is copied there.
    max_position_embeddings: the model's limit on `max_seq_length`.
    shards: the shards to read, e.g. `HostLayout.of_process(...).shards`; default: all.
    save_tokenizer: whether this process writes `tokenizer_dir`; default: JAX process 0.

  Raises:
    CorpusError: unreadable input, or a shard without training examples.
    TokenizerError: a configured tokenizer cannot be loaded.
    ValueError: `max_seq_length` exceeds `max_position_embeddings`.
  """
  if data_cfg.max_seq_length > max_position_embeddings:
    raise ValueError(f"data.max_seq_length={data_cfg.max_seq_length} exceeds "
                     f"model.max_position_embeddings={max_position_embeddings}")
  num_shards = data_cfg.num_shards
  shards = list(range(num_shards) if shards is None else shards)
  save = jax.process_index() == 0 if save_tokenizer is None else save_tokenizer
  corpus = CorpusCounters()
  splits = read_splits(data_cfg, shards, corpus)
  tokenizer = run_tokenizer(data_cfg, tokenizer_dir, splits["train"].get(0), save)
  stats = {split: PackingStats() for split in SPLITS}
  packed = pack_splits(splits, tokenizer, data_cfg, stats, corpus)
  stores = {split: ExampleStore.concatenate(list(by_shard.values()), data_cfg.max_seq_length)
            for split, by_shard in packed.items()}
  starts = {split: dict(zip(by_shard, np.cumsum([0, *map(len, by_shard.values())]).tolist()))
            for split, by_shard in packed.items()}
  table = _shard_table(packed, num_shards)
  counters = {f"corpus/{k}": v for k, v in corpus.as_dict().items()}
  for split, split_stats in stats.items():
    counters.update({f"{split}/{k}": v for k, v in split_stats.as_dict().items()})
  counters["tokenizer/vocab_size"] = tokenizer.vocab_size
  counters["shards/read"] = len(shards)
  counters["shards/total"] = num_shards
  logging.info("Pretraining data: shards %s of %d read here: %s", shards, num_shards, counters)
  return PretrainingData(tokenizer=tokenizer, shard_table=table,
                         max_seq_length=data_cfg.max_seq_length,
                         masking=masking_of(tokenizer, data_cfg), seed=data_cfg.seed,
                         counters=counters, train=stores["train"], eval=stores["eval"],
                         train_starts=starts["train"], eval_starts=starts["eval"])
