"""MLM examples: document-aware packing into a numpy store, and dynamic masking.

Packing follows google-research/bert `create_pretraining_data` in spirit: consecutive
tokens of one document fill `[CLS] A [SEP] B [SEP]` up to `max_seq_length` (no document
ever shares a sequence with another), A and B meet at a segment (line/paragraph) boundary
where one exists, and only a document's last sequence is padded. Documents are cut by token
count, without sentence detection; there is no next-sentence objective.

Masking is a pure function of the example and (seed, epoch, example id): every epoch
draws new masks, and a resumed run replays exactly the masks it would have drawn.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from jaxfm.data.tokenizer import SpecialIds, WordPieceTokenizer
from jaxfm.data.word_segmentation import cjk_continuations


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's stream increment


def _mix(z: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective uint64 hash with full avalanche."""
  with np.errstate(over="ignore"):  # uint64 products wrap on purpose
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def _example_keys(seed: int, epochs: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """uint64 [B]: one random key per (seed, epoch, example index)."""
  key = _mix(np.full(len(indices), seed % 2**64, np.uint64) + _GOLDEN)
  key = _mix(key ^ np.asarray(epochs).astype(np.uint64))
  return _mix(key ^ np.asarray(indices).astype(np.uint64))


def _uniform(keys: np.ndarray, stream: int, length: int) -> np.ndarray:
  """float64 [B, length] in [0, 1): counter-based draws of each key's `stream`."""
  with np.errstate(over="ignore"):
    counters = (np.arange(length, dtype=np.uint64) + np.uint64(stream * length + 1)) * _GOLDEN
    bits = _mix(keys[:, None] + counters[None, :])  # [B, length]
  return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclasses.dataclass(frozen=True, eq=False)
class ExampleStore:
  """Packed, unmasked examples."""
  tokens: np.ndarray  # int32 [examples, max_seq_length], [PAD]-filled after `lengths`
  lengths: np.ndarray  # int32 [examples] non-pad tokens
  b_starts: np.ndarray  # int32 [examples] first position of segment B (== length: no B)

  def __len__(self) -> int:
    return len(self.lengths)

  @property
  def max_seq_length(self) -> int:
    return self.tokens.shape[1]

  @classmethod
  def empty(cls, max_seq_length: int) -> ExampleStore:
    return cls(np.zeros((0, max_seq_length), np.int32), np.zeros(0, np.int32),
               np.zeros(0, np.int32))

  @classmethod
  def concatenate(cls, stores: Sequence[ExampleStore], max_seq_length: int) -> ExampleStore:
    if not stores:
      return cls.empty(max_seq_length)
    return cls(*(np.concatenate([getattr(s, f.name) for s in stores])
                 for f in dataclasses.fields(cls)))


@dataclasses.dataclass
class PackingStats:
  """Serialisable packing statistics."""
  documents: int = 0
  documents_split: int = 0  # documents spread over more than one sequence
  examples: int = 0
  tokens: int = 0  # non-pad tokens, special tokens included
  pad_tokens: int = 0

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


def pack_documents(docs: Sequence[Sequence[Sequence[int]]], special: SpecialIds,
                   max_seq_length: int, rng: np.random.Generator,
                   stats: PackingStats) -> ExampleStore:
  """Packs tokenised documents (each a list of segments of ids) into examples.

  Args:
    docs: per document, per segment, the token ids.
    special: special token ids.
    max_seq_length: T, the fixed sequence length (>= 4).
    rng: picks the A/B boundary among the segment boundaries of a sequence.
    stats: updated in place.
  """
  budget = max_seq_length - 3  # room for [CLS], [SEP], [SEP]
  segments = list(itertools.chain.from_iterable(docs))
  seg_lens = np.fromiter(map(len, segments), np.int64, count=len(segments))  # [segments]
  flat = np.fromiter(itertools.chain.from_iterable(segments), np.int32,
                     count=int(seg_lens.sum()))  # [tokens] all documents back to back
  seg_ends = np.cumsum(seg_lens)  # [segments] end offset of each segment in `flat`
  doc_lens = np.fromiter((sum(map(len, d)) for d in docs), np.int64, count=len(docs))
  doc_ends = np.cumsum(doc_lens)  # [docs]
  doc_starts = doc_ends - doc_lens
  chunks_per_doc = -(-doc_lens // budget)  # ceil; 0 for an empty document
  # One chunk (example body) per `budget` tokens of each document.
  starts = np.repeat(doc_starts, chunks_per_doc)  # [examples]
  first = np.repeat(np.cumsum(chunks_per_doc) - chunks_per_doc, chunks_per_doc)
  starts += budget * (np.arange(len(starts)) - first)
  ends = np.minimum(starts + budget, np.repeat(doc_ends, chunks_per_doc))  # [examples]
  lens = ends - starts
  stats.documents += len(docs)
  stats.documents_split += int((chunks_per_doc > 1).sum())
  if not len(starts):
    return ExampleStore.empty(max_seq_length)

  # A/B boundary: a random segment boundary strictly inside the chunk, else a random token
  # position; a one-token chunk has no B.
  lo = np.searchsorted(seg_ends, starts, side="right")
  inner = np.searchsorted(seg_ends, ends, side="left") - lo  # [examples] boundaries inside
  u = rng.random(len(starts))
  a_from_segments = seg_ends[np.minimum(lo + (u * inner).astype(np.int64), len(seg_ends) - 1)]
  a_from_tokens = starts + 1 + (u * np.maximum(lens - 1, 0)).astype(np.int64)
  a_ends = np.where(inner > 0, a_from_segments, np.where(lens > 1, a_from_tokens, ends))
  a_lens = a_ends - starts  # [examples]
  has_b = a_lens < lens
  lengths = lens + 2 + has_b  # [examples]
  b_starts = np.where(has_b, a_lens + 2, lengths)

  # Gather: position j of an example reads flat[start + j - 1] in A, flat[start + j - 2] in B.
  j = np.arange(max_seq_length)[None, :]  # [1, T]
  in_a = (j >= 1) & (j <= a_lens[:, None])  # [examples, T]
  in_b = (j >= b_starts[:, None]) & (j < lengths[:, None] - 1)
  source = starts[:, None] + j - np.where(in_b, 2, 1)
  tokens = np.where(in_a | in_b, flat[np.clip(source, 0, len(flat) - 1)], special.pad)
  tokens[:, 0] = special.cls
  is_sep = (j == a_lens[:, None] + 1) | (has_b[:, None] & (j == lengths[:, None] - 1))
  tokens = np.where(is_sep, special.sep, tokens).astype(np.int32)

  stats.examples += len(starts)
  stats.tokens += int(lengths.sum())
  stats.pad_tokens += int(len(starts) * max_seq_length - lengths.sum())
  return ExampleStore(tokens, lengths.astype(np.int32), b_starts.astype(np.int32))


def held_out(num_docs: int, fraction: float, seed: int, shard: int = 0) -> np.ndarray:
  """bool [num_docs]: which documents of a shard form the eval split, by a hash of
  (seed, shard, index in the shard)."""
  split_epoch = np.full(num_docs, 2**64 - 1 - shard, np.uint64)  # no masking epoch gets there
  keys = _example_keys(seed, split_epoch, np.arange(num_docs))  # [docs]
  return (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


def _batches(docs: Iterable[Sequence[str]], chars: int) -> Iterator[list[Sequence[str]]]:
  """Groups documents into batches of about `chars` characters."""
  batch: list[Sequence[str]] = []
  size = 0
  for doc in docs:
    batch.append(doc)
    size += sum(map(len, doc))
    if size >= chars:
      yield batch
      batch, size = [], 0
  if batch:
    yield batch


def build_store(docs: Iterable[Sequence[str]], tokenizer: WordPieceTokenizer,
                max_seq_length: int, rng: np.random.Generator, stats: PackingStats,
                chars_per_batch: int = 1 << 22) -> ExampleStore:
  """Tokenises (in parallel, ~`chars_per_batch` characters at a time) and packs documents."""
  stores = []
  for batch in _batches(docs, chars_per_batch):
    ids = iter(tokenizer.encode_batch([segment for doc in batch for segment in doc]))
    tokenised = [[next(ids) for _ in doc] for doc in batch]
    stores.append(pack_documents(tokenised, tokenizer.special_ids, max_seq_length, rng, stats))
  return ExampleStore.concatenate(stores, max_seq_length)


@dataclasses.dataclass(frozen=True, eq=False)
class Masking:
  """How to mask; build with `Masking.for_tokenizer`."""
  max_predictions: int  # P
  mask_prob: float
  whole_word: bool
  mask_id: int
  maskable: np.ndarray  # bool [vocab]: False for the special tokens
  word_start: np.ndarray  # bool [vocab]: False for '##' continuation pieces
  random_ids: np.ndarray  # int32 [R]: what a random replacement draws from (what the model sees)
  # int32 [vocab]: the id the model sees: `##X` -> `X` for CJK characters that a word segmenter
  # marked as continuing a word (`jaxfm.data.word_segmentation`), else the id itself.
  model_ids: np.ndarray

  @classmethod
  def for_tokenizer(cls, tokenizer: WordPieceTokenizer, *, max_predictions: int,
                    mask_prob: float = 0.15, whole_word: bool = False) -> Masking:
    special = tokenizer.special_ids
    not_special = np.ones(tokenizer.vocab_size, bool)
    not_special[list(dataclasses.astuple(special))] = False
    model_ids = np.arange(tokenizer.vocab_size, dtype=np.int32)
    chars, pieces = cjk_continuations(tokenizer.vocab)
    model_ids[pieces] = chars
    seen = not_special & (model_ids == np.arange(tokenizer.vocab_size))  # [vocab]
    return cls(max_predictions, mask_prob, whole_word, special.mask, not_special,
               tokenizer.word_start, np.flatnonzero(seen).astype(np.int32), model_ids)


def _choose_whole_words(tokens: np.ndarray, candidates: np.ndarray, score: np.ndarray,
                        target: np.ndarray, masking: Masking) -> np.ndarray:
  """bool [B, T]: whole words, in `score` order, skipping those that would overflow `target`."""
  batch, length = tokens.shape
  t = np.arange(length)
  after_candidate = np.pad(candidates[:, :-1], ((0, 0), (1, 0)))  # [B, T]
  # A word starts at a non-'##' piece or right after a non-candidate (special) position.
  is_start = candidates & (masking.word_start[tokens] | ~after_candidate)  # [B, T]
  start_of = np.maximum.accumulate(np.where(is_start, t, 0), axis=1)  # [B, T] own word's start
  flat_start = np.arange(batch)[:, None] * length + start_of  # [B, T]
  sizes = np.bincount(flat_start[candidates], minlength=batch * length).reshape(batch, length)
  order = np.argsort(np.where(is_start, score, 2.0), axis=1)  # [B, T] starts, best first
  ordered_sizes = np.take_along_axis(sizes, order, axis=1)  # [B, T]
  num_words = is_start.sum(axis=1)  # [B]
  take = np.zeros((batch, length), bool)  # [B, T] by rank
  total = np.zeros(batch, np.int64)  # [B]
  for rank in range(int(num_words.max(initial=0))):
    if (total >= target).all():
      break
    fits = (rank < num_words) & (total + ordered_sizes[:, rank] <= target)  # [B]
    take[:, rank] = fits
    total += np.where(fits, ordered_sizes[:, rank], 0)
  chosen_start = np.zeros((batch, length), bool)
  np.put_along_axis(chosen_start, order, take, axis=1)
  return candidates & np.take_along_axis(chosen_start, start_of, axis=1)


def example_ids(shards: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """int64 [B]: the corpus-wide id of example `indices[b]` of shard `shards[b]`."""
  return np.asarray(shards, np.int64) << 40 | np.asarray(indices, np.int64)


def mask_batch(tokens: np.ndarray, lengths: np.ndarray, b_starts: np.ndarray, masking: Masking,
               *, seed: int, epochs: np.ndarray, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Masks packed examples; row b depends only on its data and (seed, epochs[b], indices[b]).

  Chooses round(mask_prob * maskable tokens) positions (at least 1, at most P), whole words
  if `masking.whole_word`; of those 80% become [MASK], 10% a random non-special token and
  10% stay. The randomness is a counter-based hash of (seed, epoch, example index), so a
  row's masks do not depend on the rest of the batch.

  Args:
    tokens: int32 [B, T] packed examples.
    lengths: int32 [B] non-pad tokens.
    b_starts: int32 [B] first position of segment B (token type 1 from there to the length).
    masking: what and how much to mask.
    seed: the data seed.
    epochs, indices: int [B] each example's epoch and id (see `example_ids`).

  Returns:
    input_ids, token_type_ids, attention_mask: int32 [B, T]; masked_positions, masked_ids:
    int32 [B, P] (padding points at position 0); masked_weights: float32 [B, P].
  """
  batch, length = tokens.shape
  p = masking.max_predictions
  t = np.arange(length)[None, :]  # [1, T]
  in_length = t < lengths[:, None]  # [B, T]
  candidates = masking.maskable[tokens] & in_length  # [B, T]
  num_candidates = candidates.sum(axis=1)  # [B]
  target = np.floor(num_candidates * masking.mask_prob + 0.5).astype(np.int64)
  target = np.minimum(p, np.where(num_candidates > 0, np.maximum(target, 1), 0))  # [B]
  keys = _example_keys(seed, epochs, indices)  # [B]
  score = np.where(candidates, _uniform(keys, 0, length), 2.0)  # [B, T] lower = earlier
  if masking.whole_word:
    chosen = _choose_whole_words(tokens, candidates, score, target, masking)
  else:
    chosen = np.zeros((batch, length), bool)
    np.put_along_axis(chosen, np.argsort(score, axis=1), t < target[:, None], axis=1)
  tokens = masking.model_ids[tokens]  # [B, T] word marks were for choosing, not for the model
  decide = _uniform(keys, 1, length)  # [B, T]
  pick = (_uniform(keys, 2, length) * len(masking.random_ids)).astype(np.int64)  # [B, T]
  new = np.where(decide < 0.8, masking.mask_id,
                 np.where(decide < 0.9, tokens, masking.random_ids[pick]))
  weights = np.arange(p)[None, :] < chosen.sum(axis=1)[:, None]  # [B, P]
  # Chosen positions first, ascending (stable sort of "not chosen").
  positions = np.where(weights, np.argsort(~chosen, axis=1, kind="stable")[:, :p], 0)  # [B, P]
  return {
      "input_ids": np.where(chosen, new, tokens).astype(np.int32),
      "token_type_ids": ((t >= b_starts[:, None]) & in_length).astype(np.int32),
      "attention_mask": in_length.astype(np.int32),
      "masked_positions": positions.astype(np.int32),
      "masked_ids": np.where(weights, np.take_along_axis(tokens, positions, axis=1), 0)
                    .astype(np.int32),
      "masked_weights": weights.astype(np.float32),
  }


def mask_example(tokens: np.ndarray, length: int, b_start: int, masking: Masking, *,
                 seed: int, epoch: int, index: int) -> dict[str, np.ndarray]:
  """`mask_batch` for one example: int32 [T] / [P] arrays, float32 [P] weights."""
  batch = mask_batch(tokens[None], np.array([length]), np.array([b_start]), masking, seed=seed,
                     epochs=np.array([epoch]), indices=np.array([index]))
  return {k: v[0] for k, v in batch.items()}


def padding_example(max_seq_length: int, max_predictions: int,
                    special: SpecialIds) -> dict[str, np.ndarray]:
  """A `[CLS] [SEP]` example with zero weights, to fill the last eval batch."""
  tokens = np.full(max_seq_length, special.pad, np.int32)  # [T]
  tokens[:2] = special.cls, special.sep
  return {
      "input_ids": tokens,
      "token_type_ids": np.zeros(max_seq_length, np.int32),
      "attention_mask": (np.arange(max_seq_length) < 2).astype(np.int32),
      "masked_positions": np.zeros(max_predictions, np.int32),
      "masked_ids": np.zeros(max_predictions, np.int32),
      "masked_weights": np.zeros(max_predictions, np.float32),
  }
