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

Mixtures: `data.sources` names several corpora, each with a weight. Every source is split into
the same `data.num_shards` shards, and a shard's training stream interleaves its sources'
streams by weight (`Mixture`), whatever their sizes: a small source repeats (a new epoch, new
order and masks) more often than a large one. A source's shard is its own "stream"
(`stream_id`), with its own held-out documents, packing seed and epoch order; one source is the
single-corpus case, with the same examples and batches.
* `eval_batches`: one deterministic pass over this host's share of its shards' eval
  examples with epoch-0 masks; every host yields the same number of batches, the last ones
  filled with zero-weight padding examples.

Batches: input_ids, token_type_ids, attention_mask int32 [B, T]; masked_positions, masked_ids
int32 [B, P]; masked_weights float32 [B, P].
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import sys
import zlib
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxfm.data import length_groups
from jaxfm.data.corpus import CorpusCounters, CorpusError, CorpusSpec, Document, read_shards
from jaxfm.data.loader import (Batch, HostLayout, TrainIterator, num_padded_batches,
                               padded_eval_windows)
from jaxfm.data.pretraining import (ExampleStore, Masking, PackingStats, build_store,
                                    example_ids, held_out, mask_batch, padding_example)
from jaxfm.data.tokenizer import (WordPieceTokenizer, has_tokenizer, load_tokenizer,
                                  train_tokenizer)
from jaxfm.data.word_segmentation import WordMarkingTokenizer


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


@dataclasses.dataclass(frozen=True)
class Source:
  """One corpus of a mixture: a name (for counters and the manifest), comma-separated globs
  ('' = the embedded default corpus, or the tfds dataset), and its share of the examples."""
  name: str
  files: str
  weight: float


def sources_of(data_cfg: ml_collections.ConfigDict) -> tuple[Source, ...]:
  """`data.sources` as (name, files, weight) triples, else the one source `data.train_files`."""
  if data_cfg.sources:
    return tuple(Source(str(name), str(files), float(weight))
                 for name, files, weight in data_cfg.sources)
  return (Source("corpus", data_cfg.train_files, 1.0),)


def stream_id(source: int, shard: int, num_shards: int) -> int:
  """The id that seeds held-out documents, packing and epoch order of a source's shard (the
  shard itself for source 0, so one source is the single-corpus case)."""
  return source * num_shards + shard


@dataclasses.dataclass(frozen=True)
class Mixture:
  """How a shard's training stream interleaves its sources' streams: position p is element q
  of source s's stream, by the rule of grain's `MapDataset.mix` (`SelectionWithProportionsMap`):
  among the first n positions source s holds floor-exact shares of n by its weight, within one
  example in every window, deterministic and random-access (a pure function of p).

  Written here, vectorised, because grain's selection is one Python call per element and has no
  counts; `tests/test_mixture.py` checks it against grain's.
  """
  names: tuple[str, ...]
  weights: tuple[float, ...]  # > 0; normalised

  @classmethod
  def of(cls, sources: Sequence[Source]) -> Mixture:
    return cls(tuple(s.name for s in sources), tuple(s.weight for s in sources))

  @property
  def proportions(self) -> tuple[int, ...]:
    """The weights as the smallest integers in the same ratios (weights with more than three
    significant decimals: rounded to parts of 2**20)."""
    exact = [fractions.Fraction(w).limit_denominator(1000) for w in self.weights]
    scale = math.lcm(*(f.denominator for f in exact))
    ints = [int(f * scale) for f in exact]
    ints = [i // math.gcd(*ints) for i in ints]
    if sum(ints) > 1 << 20:  # keeps position * total within int64 for 2**40 positions
      total = sum(self.weights)
      ints = [max(1, round(w / total * (1 << 20))) for w in self.weights]
    return tuple(ints)

  def select(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int64 [N] stream positions -> (source [N], element of that source's stream [N])."""
    props = self.proportions
    remaining = sum(props)
    k = np.asarray(positions, np.int64)
    k1 = k + 1
    sources = np.full(k.shape, -1, np.int64)
    elements = np.zeros(k.shape, np.int64)
    for s, p in enumerate(props):  # source s takes k - floor(k (rest) / total) of the first k
      next_k, next_k1 = k * (remaining - p) // remaining, k1 * (remaining - p) // remaining
      hit = (sources < 0) & (k - next_k != k1 - next_k1)
      sources[hit], elements[hit] = s, (k1 - next_k1)[hit] - 1
      remaining -= p
      k, k1 = next_k, next_k1
    return sources, elements

  def counts(self, n: int) -> np.ndarray:
    """int64 [K]: how many of the first `n` positions each source holds."""
    props, out = self.proportions, []
    remaining = sum(props)
    for p in props:
      rest = n * (remaining - p) // remaining
      out.append(n - rest)
      n, remaining = rest, remaining - p
    return np.array(out, np.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class _MixedHostBatch:
  """Batch number -> this host's training batch; picklable for grain's workers.

  Row r of global batch j is position p = j * R + r % R of shard v = r // R (R rows per shard,
  `loader.HostLayout`). The mixture makes p element q of source s's stream of shard v: example
  `order(s, v, epoch)[q % n]` of its epoch q // n, where n is the source's examples in shard v,
  which start at row `starts[v, s]` of the shard.
  """
  fetch: Callable[[np.ndarray, np.ndarray, np.ndarray], Batch]
  source_sizes: np.ndarray  # int [S, K] training examples per shard and source (0: not read)
  mixture: Mixture
  seed: int
  layout: HostLayout
  _orders: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_orders": {}}

  def _order(self, shard: int, source: int, epoch: int) -> np.ndarray:
    """int64 [n]: the example order of one epoch of a source's shard (its last epoch kept)."""
    key = (shard, source)
    if self._orders.get(key, (None,))[0] != epoch:
      self._orders[key] = epoch, length_groups.shuffled_order(
          int(self.source_sizes[shard, source]), self.seed,
          stream_id(source, shard, self.layout.num_shards), epoch)
    return self._orders[key][1]

  def __call__(self, batch_number: int) -> Batch:
    shards, offsets = np.divmod(self.layout.rows, self.layout.shard_rows)  # [B], [B]
    sources, elements = self.mixture.select(batch_number * self.layout.shard_rows + offsets)
    epochs, within = np.divmod(elements, self.source_sizes[shards, sources])  # [B], [B]
    starts = np.cumsum(self.source_sizes, axis=1) - self.source_sizes  # [S, K]
    indices = np.empty_like(within)
    for v, s, e in set(zip(shards.tolist(), sources.tolist(), epochs.tolist())):
      here = (shards == v) & (sources == s) & (epochs == e)
      indices[here] = starts[v, s] + self._order(v, s, e)[within[here]]
    return self.fetch(shards, epochs, indices)


class MlmTrainIterator(TrainIterator):
  """`loader.TrainIterator` whose state also counts the training examples seen per source
  (`examples_seen/<source>`, all hosts together), saved with every checkpoint and logged then."""

  def __init__(self, batches: grain.MapDataset, *, worker_count: int,
               fingerprint: dict[str, int], seen: Callable[[int], dict[str, int]]):
    super().__init__(batches, worker_count=worker_count, fingerprint=fingerprint)
    self._seen = seen

  def examples_seen(self) -> dict[str, int]:
    """'examples_seen/<source>' -> training examples of that source in the batches so far."""
    return self._seen(self._consumed)

  def get_state(self) -> dict[str, int]:
    seen = self.examples_seen()
    logging.info("Training examples seen per source after %d batches: %s", self._consumed, seen)
    return {**super().get_state(), **seen}


def _examples_seen(mixture: Mixture, layout: HostLayout, batches: int) -> dict[str, int]:
  """'examples_seen/<source>' in the first `batches` global batches: positions
  [0, batches * R) of each of the S shards' streams, which interleave their sources alike."""
  counts = layout.num_shards * mixture.counts(batches * layout.shard_rows)
  return {f"examples_seen/{name}": int(n) for name, n in zip(mixture.names, counts)}


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
  examples, crc32 of its training tokens; -1 where no host read it), the same on every host,
  and `source_sizes` int32 [S, K] its training examples per source (a shard's examples are
  its sources' back to back, in `mixture` order).
  """
  tokenizer: WordPieceTokenizer
  shard_table: np.ndarray
  source_sizes: np.ndarray
  mixture: Mixture
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
    here = np.isin(np.arange(self.num_shards), list(self.shards_here))[:, None]  # [S, 1]
    sizes = np.where(here, self.source_sizes, 0)  # [S, K]
    fetch = _MaskBatch(self.rows("train"), self.masking, seed)
    batches = grain.MapDataset.range(sys.maxsize).map(
        _MixedHostBatch(fetch, sizes, self.mixture, seed, layout))
    fingerprint = {
        "num_examples": int(self.shard_table[:, 0].sum()),
        "examples_crc32": zlib.crc32(self.shard_table[:, [0, 2]].tobytes()),
        "num_shards": self.num_shards,
        "seed": seed,
        "global_batch_size": layout.global_batch_size,
    }
    if len(self.mixture.names) > 1:
      fingerprint["mixture_crc32"] = zlib.crc32(repr(
          (self.mixture.names, self.mixture.proportions, self.source_sizes.tolist())).encode())
    return MlmTrainIterator(batches, worker_count=worker_count, fingerprint=fingerprint,
                            seen=functools.partial(_examples_seen, self.mixture, layout))

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
                                vocab_size=data_cfg.vocab_size, lowercase=data_cfg.lowercase,
                                cjk_pieces=bool(data_cfg.get("word_segmenter")))
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

SplitDocs = dict[str, dict[int, list[list[Document]]]]  # split -> shard -> source -> documents
Packed = dict[str, dict[int, list[ExampleStore]]]  # split -> shard -> source -> examples


def read_splits(data_cfg: ml_collections.ConfigDict, shards: Sequence[int],
                corpus: CorpusCounters) -> SplitDocs:
  """The shards `shards` of every source, each holding out `eval_fraction` of its documents
  (by a hash of seed, stream and position)."""
  base = CorpusSpec.from_config(data_cfg)
  splits: SplitDocs = {split: {v: [] for v in shards} for split in SPLITS}
  for s, source in enumerate(sources_of(data_cfg)):
    spec = dataclasses.replace(base, train_files=source.files)
    for v, docs in read_shards(spec, corpus, data_cfg.num_shards, shards).items():
      is_eval = held_out(len(docs), data_cfg.eval_fraction, data_cfg.seed,
                         stream_id(s, v, data_cfg.num_shards))  # [docs]
      splits["train"][v].append([d for d, e in zip(docs, is_eval) if not e])
      splits["eval"][v].append([d for d, e in zip(docs, is_eval) if e])
  return splits


def pack_splits(splits: SplitDocs, tokenizer: WordPieceTokenizer,
                data_cfg: ml_collections.ConfigDict, stats: dict[str, PackingStats],
                corpus: CorpusCounters) -> Packed:
  """split -> shard -> source -> its documents tokenised and packed (rng seeded per split and
  stream).

  Raises:
    CorpusError: a source's shard without training examples.
  """
  num_shards = data_cfg.num_shards
  encoder = word_marking(tokenizer, data_cfg)
  packed = {split: {v: [build_store(docs, encoder, data_cfg.max_seq_length,
                                    np.random.default_rng([data_cfg.seed, i,
                                                           stream_id(s, v, num_shards)]),
                                    stats[split])
                        for s, docs in enumerate(by_source)]
                    for v, by_source in splits[split].items()}
            for i, split in enumerate(SPLITS)}
  if isinstance(encoder, WordMarkingTokenizer):
    logging.info("Whole-word masking by %s: %d characters continue a word (%d of them without a "
                 "'##' piece in the vocabulary, left single)", data_cfg.word_segmenter,
                 encoder.marked + encoder.unmarkable, encoder.unmarkable)
  names = [source.name for source in sources_of(data_cfg)]
  for s, name in enumerate(names):
    if empty := [v for v, by_source in packed["train"].items() if not len(by_source[s])]:
      raise CorpusError(f"no training example in corpus shard(s) {empty} of data.num_shards="
                        f"{num_shards}" + (f" in source {name!r}" if len(names) > 1 else "") +
                        f" ({corpus.as_dict()}); use fewer shards")
  return packed


def word_marking(tokenizer: WordPieceTokenizer, data_cfg: ml_collections.ConfigDict
                 ) -> WordPieceTokenizer | WordMarkingTokenizer:
  """What encodes the corpus: `tokenizer`, or with `data.word_segmenter` one that marks the
  characters inside each segmented word for whole-word masking."""
  if not data_cfg.get("word_segmenter"):
    return tokenizer
  return WordMarkingTokenizer(tokenizer, data_cfg.word_segmenter, data_cfg.word_segmenter_dict)


def shard_store(by_source: Sequence[ExampleStore], max_seq_length: int) -> ExampleStore:
  """A shard's examples: its sources' back to back."""
  return (by_source[0] if len(by_source) == 1
          else ExampleStore.concatenate(list(by_source), max_seq_length))


def tokens_crc32(store: ExampleStore) -> int:
  """The crc32 of a shard's training tokens (as int32) that `shard_table` and the iterator's
  fingerprint carry."""
  return zlib.crc32(np.ascontiguousarray(store.tokens, np.int32).tobytes()) & 0x7FFFFFFF


def masking_of(tokenizer: WordPieceTokenizer, data_cfg: ml_collections.ConfigDict) -> Masking:
  """The masking `cfg.data` asks for."""
  return Masking.for_tokenizer(tokenizer, max_predictions=data_cfg.max_predictions_per_seq,
                               mask_prob=data_cfg.mask_prob,
                               whole_word=data_cfg.whole_word_masking)


def _shard_tables(packed: Packed, num_shards: int,
                  num_sources: int) -> tuple[np.ndarray, np.ndarray]:
  """(`MlmData.shard_table` [S, 3], `MlmData.source_sizes` [S, K]) of every shard of the
  corpus, the same on every host (-1 where no host read a shard)."""
  table = np.full((num_shards, 3 + num_sources), -1, np.int32)
  for v, by_source in packed["train"].items():
    train = shard_store(by_source, by_source[0].max_seq_length)
    table[v] = (len(train), sum(map(len, packed["eval"][v])), tokens_crc32(train),
                *map(len, by_source))
  table = _all_processes_max(table) if num_shards > 1 else table
  return table[:, :3], table[:, 3:]


def build_pretraining_data(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None, *,
                           max_position_embeddings: int, shards: Sequence[int] | None = None,
                           save_tokenizer: bool | None = None) -> PretrainingData:
  """Reads, splits, tokenises and packs the shards `shards` of the corpus of `cfg.data`.

  The corpus (every source of a mixture) is split into `data_cfg.num_shards` shards (see
  `corpus.read_shards`); each shard holds out `eval_fraction` of its documents. With several
  JAX processes, every process must call this (it exchanges the shards' sizes, and may wait for
  the tokenizer).

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
  num_shards, length = data_cfg.num_shards, data_cfg.max_seq_length
  shards = list(range(num_shards) if shards is None else shards)
  save = jax.process_index() == 0 if save_tokenizer is None else save_tokenizer
  corpus = CorpusCounters()
  splits = read_splits(data_cfg, shards, corpus)
  tokenizer = run_tokenizer(data_cfg, tokenizer_dir, shard0_documents(splits), save)
  stats = {split: PackingStats() for split in SPLITS}
  packed = pack_splits(splits, tokenizer, data_cfg, stats, corpus)
  stores = {split: ExampleStore.concatenate([shard_store(by_source, length)
                                             for by_source in by_shard.values()], length)
            for split, by_shard in packed.items()}
  starts = {split: dict(zip(by_shard, np.cumsum(
                [0, *(sum(map(len, by_source)) for by_source in by_shard.values())]).tolist()))
            for split, by_shard in packed.items()}
  sources = sources_of(data_cfg)
  table, source_sizes = _shard_tables(packed, num_shards, len(sources))
  counters = {f"corpus/{k}": v for k, v in corpus.as_dict().items()}
  for split, split_stats in stats.items():
    counters.update({f"{split}/{k}": v for k, v in split_stats.as_dict().items()})
  counters["tokenizer/vocab_size"] = tokenizer.vocab_size
  counters["shards/read"] = len(shards)
  counters["shards/total"] = num_shards
  logging.info("Pretraining data: shards %s of %d read here: %s", shards, num_shards, counters)
  return PretrainingData(tokenizer=tokenizer, shard_table=table, source_sizes=source_sizes,
                         mixture=Mixture.of(sources), max_seq_length=length,
                         masking=masking_of(tokenizer, data_cfg), seed=data_cfg.seed,
                         counters=counters, train=stores["train"], eval=stores["eval"],
                         train_starts=starts["train"], eval_starts=starts["eval"])


def shard0_documents(splits: SplitDocs) -> list[Document] | None:
  """The training documents of shard 0 (every source's), which a trained tokenizer learns
  from; None when shard 0 was not read."""
  by_source = splits["train"].get(0)
  return None if by_source is None else [doc for docs in by_source for doc in docs]
