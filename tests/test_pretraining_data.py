"""Packing into the example store and dynamic MLM masking."""

import numpy as np
import pytest

from jaxfm.data.pretraining import (Masking, PackingStats, build_store, held_out, mask_batch,
                                    mask_example, pack_documents, padding_example)
from jaxfm.data.tokenizer import SpecialIds, train_tokenizer

SPECIAL = SpecialIds(pad=0, unk=1, cls=2, sep=3, mask=4)
VOCAB = 1000
T = 32
P = 8


def _masking(whole_word: bool = False, max_predictions: int = P,
             word_start: np.ndarray | None = None) -> Masking:
  maskable = np.arange(VOCAB) >= 5  # not a special token
  return Masking(max_predictions, 0.15, whole_word, SPECIAL.mask, maskable,
                 np.ones(VOCAB, bool) if word_start is None else word_start,
                 np.arange(5, VOCAB, dtype=np.int32), np.arange(VOCAB, dtype=np.int32))


def _docs(rng: np.random.Generator, num_docs: int) -> list[list[list[int]]]:
  """Documents of random segments; document d uses only ids in [100 d + 10, 100 d + 100)."""
  return [[list(rng.integers(100 * d + 10, 100 * d + 100, size=rng.integers(1, 40)))
           for _ in range(rng.integers(1, 6))] for d in range(num_docs)]


def test_packing_keeps_documents_apart_and_in_order():
  rng = np.random.default_rng(0)
  docs = _docs(rng, 9)
  stats = PackingStats()
  store = pack_documents(docs, SPECIAL, T, np.random.default_rng(1), stats)
  assert store.tokens.dtype == np.int32 and store.tokens.shape == (len(store), T)
  bodies: dict[int, list[int]] = {}
  for row, length, b_start in zip(store.tokens, store.lengths, store.b_starts):
    assert row[0] == SPECIAL.cls and row[length - 1] == SPECIAL.sep
    assert (row[length:] == SPECIAL.pad).all()
    body = row[1:length - 1]
    if b_start < length:  # [CLS] A [SEP] B [SEP]
      assert row[b_start - 1] == SPECIAL.sep and b_start >= 3 and length - b_start >= 2
      body = np.concatenate([row[1:b_start - 1], row[b_start:length - 1]])
    assert not np.isin(body, list(range(5))).any()
    doc_ids = set(body // 100)
    assert len(doc_ids) == 1  # never two documents in one sequence
    bodies.setdefault(doc_ids.pop(), []).extend(body)
  for d, doc in enumerate(docs):
    assert bodies[d] == [t for segment in doc for t in segment]
  lengths = [sum(map(len, doc)) for doc in docs]
  assert stats.documents == 9 and stats.examples == len(store)
  assert stats.documents_split == sum(n > T - 3 for n in lengths)
  assert len(store) == sum(-(-n // (T - 3)) for n in lengths)  # only a document's tail pads
  assert stats.tokens == store.lengths.sum()
  assert stats.pad_tokens == len(store) * T - store.lengths.sum()


def test_a_b_boundary_is_a_segment_boundary_when_there_is_one():
  docs = [[[11] * 5, [12] * 6, [13] * 4]]  # 15 tokens fit in one sequence
  for seed in range(10):
    store = pack_documents(docs, SPECIAL, T, np.random.default_rng(seed), PackingStats())
    row, b = store.tokens[0], store.b_starts[0]
    assert len(store) == 1 and store.lengths[0] == 18 and b in (7, 13)
    assert row[b - 2] != row[b]  # the segments differ on either side of [SEP]
  one = pack_documents([[[11]], [[12, 13]]], SPECIAL, T, np.random.default_rng(0), PackingStats())
  assert list(one.lengths) == [3, 5] and list(one.b_starts) == [3, 3]  # [CLS] A [SEP] ([SEP] B)


def test_token_types_attention_and_shapes():
  store = pack_documents(_docs(np.random.default_rng(2), 4), SPECIAL, T,
                         np.random.default_rng(3), PackingStats())
  for i in range(len(store)):
    ex = mask_example(store.tokens[i], store.lengths[i], store.b_starts[i], _masking(), seed=0,
                      epoch=0, index=i)
    assert {k: (v.dtype, v.shape) for k, v in ex.items()} == {
        "input_ids": (np.int32, (T,)), "token_type_ids": (np.int32, (T,)),
        "attention_mask": (np.int32, (T,)), "masked_positions": (np.int32, (P,)),
        "masked_ids": (np.int32, (P,)), "masked_weights": (np.float32, (P,))}
    length, b = store.lengths[i], store.b_starts[i]
    t = np.arange(T)
    np.testing.assert_array_equal(ex["attention_mask"], t < length)
    np.testing.assert_array_equal(ex["token_type_ids"], (t >= b) & (t < length))


def _random_batch(rng, batch: int):
  tokens = rng.integers(5, VOCAB, size=(batch, T)).astype(np.int32)
  lengths = rng.integers(4, T + 1, size=batch).astype(np.int32)
  b_starts = np.minimum(lengths, rng.integers(3, T, size=batch)).astype(np.int32)
  tokens[:, 0] = SPECIAL.cls
  for row, length, b in zip(tokens, lengths, b_starts):
    row[length:] = SPECIAL.pad
    row[length - 1] = SPECIAL.sep
    if b < length:
      row[b - 1] = SPECIAL.sep
  return tokens, lengths, b_starts


@pytest.mark.parametrize("whole_word", [False, True])
def test_masking_statistics_and_specials(whole_word):
  rng = np.random.default_rng(4)
  tokens, lengths, b_starts = _random_batch(rng, 8000)
  word_start = rng.random(VOCAB) < 0.6
  masking = _masking(whole_word, max_predictions=T, word_start=word_start)
  out = mask_batch(tokens, lengths, b_starts, masking, seed=7, epochs=np.zeros(8000, int),
                   indices=np.arange(8000))
  weights = out["masked_weights"] > 0  # [B, P]
  rows = np.nonzero(weights)[0]
  positions = out["masked_positions"][weights]
  originals = tokens[rows, positions]
  np.testing.assert_array_equal(out["masked_ids"][weights], originals)
  maskable = masking.maskable[tokens] & (np.arange(T) < lengths[:, None])
  assert maskable.sum() > 100_000
  assert (originals >= 5).all()  # never a special token
  assert abs(weights.sum() / maskable.sum() - 0.15) < 0.01
  new = out["input_ids"][rows, positions]
  as_mask, kept = np.mean(new == SPECIAL.mask), np.mean(new == originals)
  assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01
  assert abs(1 - as_mask - kept - 0.1) < 0.01  # random replacements
  assert not np.isin(new[(new != SPECIAL.mask) & (new != originals)], list(range(5))).any()
  unmasked = np.ones_like(tokens, bool)
  unmasked[rows, positions] = False
  np.testing.assert_array_equal(out["input_ids"][unmasked], tokens[unmasked])
  assert (out["masked_positions"][~weights] == 0).all() and (out["masked_ids"][~weights] == 0).all()


def test_whole_word_masking_never_splits_a_word():
  rng = np.random.default_rng(5)
  tokens, lengths, b_starts = _random_batch(rng, 2000)
  word_start = rng.random(VOCAB) < 0.4  # long words
  masking = _masking(True, word_start=word_start)
  out = mask_batch(tokens, lengths, b_starts, masking, seed=1, epochs=np.zeros(2000, int),
                   indices=np.arange(2000))
  for row, length, positions, weights in zip(tokens, lengths, out["masked_positions"],
                                             out["masked_weights"]):
    chosen = set(positions[weights > 0].tolist())
    assert len(chosen) <= P
    word: list[int] = []
    for t in range(1, length + 1):  # close a word at a word start or a special token
      if t == length or not masking.maskable[row[t]] or word_start[row[t]]:
        if word:
          assert len(chosen & set(word)) in (0, len(word)), (word, chosen)
        word = []
      if t < length and masking.maskable[row[t]]:
        word.append(t)


def test_masks_are_a_pure_function_of_seed_epoch_index():
  tokens, lengths, b_starts = _random_batch(np.random.default_rng(6), 16)
  masking = _masking()

  def run(seed, epoch, order):
    return mask_batch(tokens[order], lengths[order], b_starts[order], masking, seed=seed,
                      epochs=np.full(16, epoch), indices=order)

  order = np.arange(16)
  first, again = run(0, 0, order), run(0, 0, order)
  shuffled = run(0, 0, order[::-1])  # a row does not depend on the rest of the batch
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])
    np.testing.assert_array_equal(first[k], shuffled[k][::-1])
  single = mask_example(tokens[3], lengths[3], b_starts[3], masking, seed=0, epoch=0, index=3)
  for k in single:
    np.testing.assert_array_equal(single[k], first[k][3])
  for other in (run(0, 1, order), run(1, 0, order)):
    assert (other["masked_positions"] != first["masked_positions"]).any(axis=1).mean() > 0.8


def test_max_predictions_cap_and_padding_example():
  tokens = np.full((64, T), 7, np.int32)  # all maskable: 15% of 32 would be 5
  lengths, b_starts = np.full(64, T), np.full(64, T)
  out = mask_batch(tokens, lengths, b_starts, _masking(max_predictions=2), seed=0,
                   epochs=np.zeros(64, int), indices=np.arange(64))
  assert (out["masked_weights"].sum(axis=1) == 2).all()
  pad = padding_example(T, P, SPECIAL)
  assert pad["masked_weights"].sum() == 0 and list(pad["input_ids"][:3]) == [2, 3, 0]
  assert pad["attention_mask"].sum() == 2


def test_held_out_is_deterministic_and_sized():
  split = held_out(20_000, 0.1, seed=3)
  np.testing.assert_array_equal(split, held_out(20_000, 0.1, seed=3))
  assert abs(split.mean() - 0.1) < 0.01
  assert (split != held_out(20_000, 0.1, seed=4)).any()
  assert not held_out(100, 0.0, seed=0).any()


def test_build_store_tokenises_and_packs():
  docs = [["the quick brown fox", "jumps over the lazy dog"], ["a tiny document"],
          ["lorem ipsum dolor sit amet " * 30]]
  tokenizer = train_tokenizer([s for d in docs for s in d] * 5, vocab_size=200)
  stats = PackingStats()
  store = build_store(docs, tokenizer, 16, np.random.default_rng(0), stats,
                      chars_per_batch=40)  # several tokenising batches
  ids = [tokenizer.encode_batch(doc) for doc in docs]
  want = pack_documents(ids, tokenizer.special_ids, 16, np.random.default_rng(0), PackingStats())
  np.testing.assert_array_equal(store.tokens, want.tokens)
  split = sum(sum(map(len, doc)) > 16 - 3 for doc in ids)
  assert stats.documents == 3 and stats.documents_split == split >= 1
  assert len(store) == stats.examples
  text = tokenizer.decode(store.tokens[0][:store.lengths[0]])
  assert text.startswith("[CLS] the quick brown fox") and text.endswith("[SEP]")
