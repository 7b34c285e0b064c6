"""MLM pretraining input: `build_pretraining_data`, the one entry point the trainer calls.

The corpus is split into `data.num_shards` shards (whole files when there are enough, else
every S-th document; `corpus.read_shards`). Row r of every global batch of G rows comes from
shard r // (G / S), so the global batch is the same whatever the host count, and a host
reads, tokenises and packs only the shards its rows come from (`HostLayout.shards`). Each
shard holds out `eval_fraction` of its documents; the tokenizer, unless configured, is
trained on shard 0 (by the hosts that read it; the others load what process 0 saved).

* `train_iterator`: a grain pipeline over an endless stream per shard, each epoch of a shard
  a permutation seeded with (seed, shard, epoch), so every example of a shard is seen once
  per epoch of that shard. Each example is masked with (seed, epoch, example id), so every
  epoch draws new masks and a resume replays them. Its state is the number of batches
  consumed plus a fingerprint (every shard's size and checksum, seed, global batch size)
  checked on restore; it is the same on every host, and since the pipeline is random-access,
  restoring replays nothing and works with any `worker_count` or host count.
* `eval_batches`: one deterministic pass over this host's share of its shards' eval
  examples with epoch-0 masks; every host yields the same number of batches, the last ones
  filled with zero-weight padding examples.

Every batch is a dict of numpy arrays with a leading per-host batch dimension B:
input_ids, token_type_ids, attention_mask int32 [B, T]; masked_positions, masked_ids
int32 [B, P]; masked_weights float32 [B, P].
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from absl import flags, logging
from jax.experimental import multihost_utils

from jaxfm.data.corpus import CorpusCounters, CorpusError, CorpusSpec, Document, read_shards
from jaxfm.data.pretraining import (ExampleStore, Masking, PackingStats, build_store,
                                    example_ids, held_out, mask_batch, padding_example)
from jaxfm.data.tokenizer import (WordPieceTokenizer, has_tokenizer, load_tokenizer,
                                  train_tokenizer)

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class HostLayout:
  """Host `host` of `hosts`, each serving `batch_size` rows of every global batch.

  The corpus is split into `num_shards` shards: rows [v * R, (v + 1) * R) of every global
  batch come from shard v (R = `shard_rows`), so the global batch is the same whatever the
  host count, and a host reads only the shards its rows come from (`shards`).
  """
  batch_size: int  # B, per host
  host: int = 0
  hosts: int = 1
  num_shards: int = 1  # S

  def __post_init__(self):
    if not 0 <= self.host < self.hosts:
      raise ValueError(f"host {self.host} must be in [0, {self.hosts})")
    if self.global_batch_size % self.num_shards:
      raise ValueError(f"the global batch of {self.global_batch_size} rows does not split into "
                       f"data.num_shards={self.num_shards} equal parts")

  @classmethod
  def of_process(cls, batch_size: int, num_shards: int = 1) -> HostLayout:
    """This JAX process's layout."""
    return cls(batch_size, jax.process_index(), jax.process_count(), num_shards)

  @property
  def global_batch_size(self) -> int:
    return self.batch_size * self.hosts

  @property
  def shard_rows(self) -> int:
    return self.global_batch_size // self.num_shards

  @property
  def rows(self) -> np.ndarray:
    """int64 [B]: this host's rows of the global batch."""
    return self.host * self.batch_size + np.arange(self.batch_size)

  @property
  def shards(self) -> range:
    """The shards this host's rows come from."""
    first, last = self.rows[[0, -1]] // self.shard_rows
    return range(int(first), int(last) + 1)

  def readers(self, shard: int) -> range:
    """The hosts whose rows come (partly) from `shard`."""
    return range(shard * self.shard_rows // self.batch_size,
                 ((shard + 1) * self.shard_rows - 1) // self.batch_size + 1)

  def eval_indices(self, shard: int, num_eval: int) -> range:
    """This host's share of the `num_eval` eval examples of `shard`, one of its readers."""
    readers = self.readers(shard)
    return range(self.host - readers.start, num_eval, len(readers))


@functools.lru_cache(maxsize=4)
def _epoch_order(num_examples: int, seed: int, shard: int, epoch: int) -> np.ndarray:
  """int64 [num_examples]: the example order of one shard's epoch."""
  return np.random.default_rng([seed, shard, epoch]).permutation(num_examples)


@dataclasses.dataclass(frozen=True, eq=False)
class _HostBatch:
  """Batch number -> this host's batch; picklable for worker processes.

  Row r of global batch j is position p = j * R + r % R of shard v = r // R (R rows per
  shard); position p is example `order(v, epoch)[p % n_v]` of the shard's epoch p // n_v,
  fetched by `fetch(shards, epochs, indices)`.
  """
  fetch: Callable[[np.ndarray, np.ndarray, np.ndarray], Batch]
  shard_sizes: tuple[int, ...]  # n_v, training examples per shard (0: not read here)
  seed: int
  layout: HostLayout

  def __call__(self, batch_number: int) -> Batch:
    shards, offsets = np.divmod(self.layout.rows, self.layout.shard_rows)  # [B], [B]
    sizes = np.asarray(self.shard_sizes)[shards]  # [B]
    epochs, within = np.divmod(batch_number * self.layout.shard_rows + offsets, sizes)
    indices = np.empty_like(within)
    for shard, epoch in set(zip(shards.tolist(), epochs.tolist())):
      here = (shards == shard) & (epochs == epoch)
      indices[here] = _epoch_order(int(sizes[here][0]), self.seed, shard, epoch)[within[here]]
    return self.fetch(shards, epochs, indices)


@dataclasses.dataclass(frozen=True, eq=False)
class _MaskBatch:
  """(shards [B], epochs [B], indices in the shard [B]) -> masked batch."""
  store: ExampleStore  # the shards read here, back to back
  starts: dict[int, int]  # shard -> its first row in `store`
  masking: Masking
  seed: int

  def __call__(self, shards: np.ndarray, epochs: np.ndarray, indices: np.ndarray) -> Batch:
    rows = np.array([self.starts[v] for v in shards.tolist()], np.int64) + indices
    return mask_batch(self.store.tokens[rows], self.store.lengths[rows],
                      self.store.b_starts[rows], self.masking, seed=self.seed, epochs=epochs,
                      indices=example_ids(shards, indices))


@dataclasses.dataclass(frozen=True, eq=False)
class _TakeRows:
  """(shards, epochs, indices) -> those rows of fixed-shape feature arrays (one shard)."""
  features: dict[str, np.ndarray]

  def __call__(self, shards: np.ndarray, epochs: np.ndarray, indices: np.ndarray) -> Batch:
    del shards, epochs  # one shard; task features do not change between epochs
    return {k: v[indices] for k, v in self.features.items()}


def cut_to_bucket(batch: Batch, longest: int, buckets: Sequence[int]) -> Batch:
  """`batch` with every field of length `buckets[-1]` on axis 1 cut to the shortest of the
  ascending `buckets` that is at least `longest`."""
  length = next(b for b in buckets if b >= longest)
  return {k: v[:, :length] if v.ndim > 1 and v.shape[1] == buckets[-1] else v
          for k, v in batch.items()}


def padded_eval_windows(share_sizes: Sequence[int], host: int,
                        batch_size: int) -> Iterator[tuple[slice, int]]:
  """The per-host padded eval batches: each host evaluates its share of the rows
  (`share_sizes[h]` rows for host h) in batches of `batch_size`, and every host runs as many
  batches as the busiest one needs, so all join the same eval steps. Yields, per batch, the
  window into `host`'s share and how many zero-weight padding rows fill it up."""
  for b in range(num_padded_batches(share_sizes, batch_size)):
    window = slice(b * batch_size, (b + 1) * batch_size)
    yield window, batch_size - len(range(share_sizes[host])[window])


def num_padded_batches(share_sizes: Sequence[int], batch_size: int) -> int:
  """Batches `padded_eval_windows` yields on every host."""
  return -(-max(share_sizes, default=0) // batch_size)


@dataclasses.dataclass(frozen=True, eq=False)
class _CutToBucket:
  """A host's batch with its length axis cut to the shortest bucket that holds the longest
  row of the whole global batch, so every host cuts its rows to the same length.

  Every host holds all the features, and the global batch does not depend on the host
  count, so each host reads the global batch's row lengths itself (`global_lengths`).
  """
  host_batch: _HostBatch
  global_lengths: _HostBatch  # batch number -> {"length": int [G]}
  buckets: tuple[int, ...]  # ascending; the last is the features' length T

  def __call__(self, batch_number: int) -> Batch:
    return cut_to_bucket(self.host_batch(batch_number),
                         self.global_lengths(batch_number)["length"].max(), self.buckets)


def feature_train_iterator(features: dict[str, np.ndarray], layout: HostLayout, *,
                           seed: int, length_buckets: Sequence[int] = ()) -> TrainIterator:
  """Endless, per-epoch reshuffled batches of fixed-shape task features, split by host.

  Every host holds all the features (`layout` has one shard); the same global order and
  checkpointable state as pretraining's `train_iterator`. With `length_buckets` (ascending
  lengths ending with the features' length T), every field of length T on axis 1 is cut to
  the shortest bucket that holds the global batch's longest row (by `attention_mask`).
  """
  num_examples = len(next(iter(features.values())))
  host_batch = _HostBatch(_TakeRows(features), (num_examples,), seed, layout)
  if len(length_buckets) > 1:
    if length_buckets[-1] != features["attention_mask"].shape[1]:
      raise ValueError(f"length_buckets {tuple(length_buckets)} must end with the features' "
                       f"length {features['attention_mask'].shape[1]}")
    lengths = {"length": features["attention_mask"].sum(axis=1)}
    whole_batch = HostLayout(layout.global_batch_size)
    host_batch = _CutToBucket(host_batch, _HostBatch(_TakeRows(lengths), (num_examples,), seed,
                                                     whole_batch), tuple(length_buckets))
  batches = grain.MapDataset.range(sys.maxsize).map(host_batch)
  fingerprint = {
      "num_examples": num_examples,
      "examples_crc32": zlib.crc32(b"".join(v.tobytes() for _, v in sorted(features.items()))),
      "seed": seed,
      "global_batch_size": layout.global_batch_size,
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


def _all_processes_max(table: np.ndarray) -> np.ndarray:
  """The elementwise max of `table` (int32) over the JAX processes (a collective)."""
  if jax.process_count() == 1:
    return table
  return np.asarray(multihost_utils.process_allgather(table)).max(axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class PretrainingData:
  """Tokenizer, packed train/eval stores of the shards read here, counters, and iterators.

  `train`/`eval` hold the shards read here back to back (`train_starts`/`eval_starts`: each
  shard's first row); `shard_table` int32 [S, 3] describes every shard of the corpus
  (training examples, eval examples, crc32 of its training examples; -1 where no host read
  it), the same on every host.
  """
  tokenizer: WordPieceTokenizer
  train: ExampleStore
  eval: ExampleStore
  train_starts: dict[int, int]
  eval_starts: dict[int, int]
  shard_table: np.ndarray
  masking: Masking
  seed: int
  counters: dict[str, int]

  @property
  def num_shards(self) -> int:
    return len(self.shard_table)

  def _check(self, layout: HostLayout) -> None:
    if layout.num_shards != self.num_shards:
      raise ValueError(f"layout has {layout.num_shards} shards, the data {self.num_shards}")
    if missing := [v for v in layout.shards if v not in self.train_starts]:
      raise ValueError(f"host {layout.host} needs shards {missing}, which were not read here")

  def train_iterator(self, layout: HostLayout, *, seed: int | None = None,
                     worker_count: int = 0) -> TrainIterator:
    """Endless training batches of the host `layout` describes."""
    self._check(layout)
    seed = self.seed if seed is None else seed
    sizes = tuple(int(n) if v in self.train_starts else 0
                  for v, n in enumerate(self.shard_table[:, 0]))
    fetch = _MaskBatch(self.train, self.train_starts, self.masking, seed)
    batches = grain.MapDataset.range(sys.maxsize).map(_HostBatch(fetch, sizes, seed, layout))
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
    mask = _MaskBatch(self.eval, self.eval_starts, self.masking, self.seed)
    padding = padding_example(self.eval.max_seq_length, self.masking.max_predictions,
                              self.tokenizer.special_ids)
    for here, fill in padded_eval_windows(self._eval_share_sizes(layout), layout.host,
                                          layout.batch_size):
      batch = mask(shards[here], np.zeros_like(indices[here]), indices[here])
      yield {k: np.concatenate([v, np.repeat(padding[k][None], fill, axis=0)])
             for k, v in batch.items()}


def _tokenizer(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None,
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
  docs = read_shards(CorpusSpec.from_config(data_cfg), corpus, num_shards, shards)
  splits = {"train": {}, "eval": {}}  # split -> shard -> documents
  for v, shard_docs in docs.items():
    is_eval = held_out(len(shard_docs), data_cfg.eval_fraction, data_cfg.seed, v)  # [docs]
    splits["train"][v] = [d for d, e in zip(shard_docs, is_eval) if not e]
    splits["eval"][v] = [d for d, e in zip(shard_docs, is_eval) if e]
  tokenizer = _tokenizer(data_cfg, tokenizer_dir, splits["train"].get(0), save)
  stats = {"train": PackingStats(), "eval": PackingStats()}
  stores, starts, sizes = {}, {}, {}
  for i, (split, by_shard) in enumerate(splits.items()):
    packed = {v: build_store(split_docs, tokenizer, data_cfg.max_seq_length,
                             np.random.default_rng([data_cfg.seed, i, v]), stats[split])
              for v, split_docs in by_shard.items()}
    stores[split] = ExampleStore.concatenate(list(packed.values()), data_cfg.max_seq_length)
    sizes[split] = {v: len(store) for v, store in packed.items()}
    starts[split] = dict(zip(packed, np.cumsum([0, *sizes[split].values()]).tolist()))
  if empty := [v for v, n in sizes["train"].items() if not n]:
    raise CorpusError(f"no training example in corpus shard(s) {empty} of data.num_shards="
                      f"{num_shards} ({corpus.as_dict()}); use fewer shards")
  table = np.full((num_shards, 3), -1, np.int32)  # [S, (train, eval, crc32)]
  for v in shards:
    rows = stores["train"].tokens[starts["train"][v]:starts["train"][v] + sizes["train"][v]]
    table[v] = sizes["train"][v], sizes["eval"][v], zlib.crc32(rows.tobytes()) & 0x7FFFFFFF
  if num_shards > 1:
    table = _all_processes_max(table)
  counters = {f"corpus/{k}": v for k, v in corpus.as_dict().items()}
  for split, split_stats in stats.items():
    counters.update({f"{split}/{k}": v for k, v in split_stats.as_dict().items()})
  counters["tokenizer/vocab_size"] = tokenizer.vocab_size
  counters["shards/read"] = len(shards)
  counters["shards/total"] = num_shards
  logging.info("Pretraining data: shards %s of %d read here: %s", shards, num_shards, counters)
  masking = Masking.for_tokenizer(tokenizer, max_predictions=data_cfg.max_predictions_per_seq,
                                  mask_prob=data_cfg.mask_prob,
                                  whole_word=data_cfg.whole_word_masking)
  return PretrainingData(tokenizer, stores["train"], stores["eval"], starts["train"],
                         starts["eval"], table, masking, data_cfg.seed, counters)
