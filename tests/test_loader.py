"""build_pretraining_data and the grain train/eval iterators."""

import json
import time

import numpy as np
import pytest

from jaxfm.config import pretrain_defaults
from jaxfm.data import loader, mlm_data
from jaxfm.data.pretraining import mask_batch
from tests.data_helpers import random_documents, unmasked

T = 32
P = 5


def _data_cfg(train_files: str, **overrides):
  cfg = pretrain_defaults().data
  cfg.update(dict(train_files=train_files, vocab_size=300, max_seq_length=T,
                  max_predictions_per_seq=P, eval_fraction=0.1, seed=3))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A random-word corpus: (glob, number of lines)."""
  docs = random_documents(np.random.default_rng(0), 150)
  folder = tmp_path_factory.mktemp("corpus")
  text = "\n\n".join(docs) + "\n"
  (folder / "docs.txt").write_text(text)
  return str(folder / "*.txt"), text.count("\n")


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
  return mlm_data.build_pretraining_data(_data_cfg(corpus[0]),
                                       str(tmp_path_factory.mktemp("run") / "tokenizer"),
                                       max_position_embeddings=64)


def _assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_build_counters_and_splits(data, corpus):
  c = data.counters
  assert sum(c[f"corpus/{k}"] for k in mlm_data.CorpusCounters.LINE_FATES) == corpus[1]
  assert c["corpus/documents"] == 150 == c["train/documents"] + c["eval/documents"]
  assert 0 < c["eval/documents"] < 40
  assert c["train/examples"] == len(data.train) and c["eval/examples"] == len(data.eval)
  assert c["tokenizer/vocab_size"] == data.tokenizer.vocab_size <= 300
  assert data.train.tokens.dtype == np.int32 and data.train.tokens.shape[1] == T
  assert all(isinstance(v, int) for v in c.values())
  json.dumps(c)


def test_saved_tokenizer_is_reused(corpus, tmp_path, monkeypatch):
  folder = str(tmp_path / "tok")
  first = mlm_data.build_pretraining_data(_data_cfg(corpus[0]), folder, max_position_embeddings=T)

  def no_training(*args, **kwargs):
    raise AssertionError("retrained although the run folder holds a tokenizer")

  monkeypatch.setattr(mlm_data, "train_tokenizer", no_training)
  again = mlm_data.build_pretraining_data(_data_cfg(corpus[0]), folder, max_position_embeddings=T)
  np.testing.assert_array_equal(first.train.tokens, again.train.tokens)
  configured = mlm_data.build_pretraining_data(_data_cfg(corpus[0], tokenizer=folder), None,
                                             max_position_embeddings=T)
  np.testing.assert_array_equal(first.eval.tokens, configured.eval.tokens)
  with pytest.raises(ValueError, match="max_position_embeddings=16"):
    mlm_data.build_pretraining_data(_data_cfg(corpus[0]), folder, max_position_embeddings=16)


def test_batch_layout(data):
  batch = next(data.train_iterator(loader.HostLayout(8, 0, 1)))
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "input_ids": (np.int32, (8, T)), "token_type_ids": (np.int32, (8, T)),
      "attention_mask": (np.int32, (8, T)), "masked_positions": (np.int32, (8, P)),
      "masked_ids": (np.int32, (8, P)), "masked_weights": (np.float32, (8, P))}


def test_state_round_trip(data):
  it = data.train_iterator(loader.HostLayout(8, 0, 1))
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state["batches_consumed"] == 5
  want = [next(it) for _ in range(4)]
  restored = data.train_iterator(loader.HostLayout(8, 0, 1))
  restored.set_state(state)
  _assert_same([next(restored) for _ in range(4)], want)
  with pytest.raises(ValueError, match="global_batch_size"):
    data.train_iterator(loader.HostLayout(4, 0, 1)).set_state(state)
  with pytest.raises(ValueError, match="seed"):
    data.train_iterator(loader.HostLayout(8, 0, 1), seed=9).set_state(state)


def test_state_restores_onto_another_host_count(data):
  one_host = data.train_iterator(loader.HostLayout(8, 0, 1))
  for _ in range(3):
    next(one_host)
  state = one_host.get_state()
  want = [next(one_host) for _ in range(2)]
  for shard in range(2):  # the same global batches, split over two hosts
    host = data.train_iterator(loader.HostLayout(4, shard, 2))
    host.set_state(state)
    for batch, whole in zip([next(host) for _ in range(2)], want):
      for k in batch:
        np.testing.assert_array_equal(batch[k], whole[k][shard * 4:(shard + 1) * 4])


def test_state_round_trip_with_a_worker_process(data):
  reference = data.train_iterator(loader.HostLayout(8, 1, 2))
  want = [next(reference) for _ in range(7)]
  it = data.train_iterator(loader.HostLayout(8, 1, 2), worker_count=1)
  try:
    _assert_same([next(it) for _ in range(3)], want[:3])
    state = it.get_state()
  finally:
    it.close()
  restored = data.train_iterator(loader.HostLayout(8, 1, 2), worker_count=1)
  try:
    restored.set_state(state)
    _assert_same([next(restored) for _ in range(4)], want[3:])
  finally:
    restored.close()


def test_shards_cover_every_example_once_per_epoch(data):
  n, batch_size, shards = len(data.train), 4, 2
  row_ids = {row.tobytes(): i for i, row in enumerate(data.train.tokens)}
  assert len(row_ids) == n  # rows are distinct, so a row identifies its example
  seen = {}  # global position -> (example index, input_ids)
  for shard in range(shards):
    it = data.train_iterator(loader.HostLayout(batch_size, shard, shards))
    for j in range(-(-2 * n // (batch_size * shards)) + 1):
      batch = next(it)
      for i, row in enumerate(unmasked(batch)):
        position = (j * shards + shard) * batch_size + i
        seen[position] = (row_ids[row.tobytes()], batch["input_ids"][i])
  epochs = [[seen[p][0] for p in range(e * n, (e + 1) * n)] for e in (0, 1)]
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert epochs[0] != epochs[1]  # reshuffled every epoch
  masks = {e: {seen[p][0]: seen[p][1] for p in range(e * n, (e + 1) * n)} for e in (0, 1)}
  differ = np.mean([(masks[0][i] != masks[1][i]).any() for i in range(n)])
  assert differ > 0.9  # new masks every epoch


@pytest.mark.parametrize("shards", [1, 2, 3])
def test_eval_batches(data, shards):
  batch_size = 4
  count = data.num_eval_batches(loader.HostLayout(batch_size, 0, shards))
  assert count == -(-(-(-len(data.eval) // shards)) // batch_size)
  found = []
  for shard in range(shards):
    batches = list(data.eval_batches(loader.HostLayout(batch_size, shard, shards)))
    assert len(batches) == count
    _assert_same(batches, list(data.eval_batches(loader.HostLayout(batch_size, shard, shards))))
    for batch in batches:
      real = batch["masked_weights"].sum(axis=1) > 0
      assert (batch["attention_mask"][~real].sum(axis=1) == 2).all()
      found.extend(unmasked(batch)[real].tolist())
  assert sorted(found) == sorted(data.eval.tokens.tolist())
  fixed = mask_batch(data.eval.tokens, data.eval.lengths, data.eval.b_starts, data.masking,
                     seed=data.seed, epochs=np.zeros(len(data.eval), int),
                     indices=np.arange(len(data.eval)))
  first = next(data.eval_batches(loader.HostLayout(len(data.eval))))
  _assert_same([first], [fixed])


def test_default_corpus_end_to_end(tmp_path):
  cfg = pretrain_defaults().data
  start = time.perf_counter()
  data = mlm_data.build_pretraining_data(cfg, str(tmp_path / "tok"), max_position_embeddings=512)
  elapsed = time.perf_counter() - start
  assert elapsed < 60, elapsed
  c = data.counters
  assert c["corpus/text_lines"] == sum(c[f"corpus/{k}"] for k in mlm_data.CorpusCounters.LINE_FATES)
  assert c["tokenizer/vocab_size"] == 8192 and len(data.train) > 2000 and len(data.eval) > 0
  assert c["train/pad_tokens"] < 0.15 * len(data.train) * 128  # packing leaves little padding
  batch = next(data.train_iterator(loader.HostLayout(32, 0, 1)))
  assert batch["input_ids"].shape == (32, 128)


def _features(n: int = 40, length: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
  """Task-like features padded with 0 to `length`: most rows of 2-4 real tokens, 1 in 10 longer."""
  rng = np.random.default_rng(seed)
  tokens = np.where(rng.random(n) < 0.1, rng.integers(5, length + 1, n), rng.integers(2, 5, n))
  real = np.arange(length)[None, :] < tokens[:, None]  # [n, length]
  return {"input_ids": np.where(real, rng.integers(5, 99, (n, length)), 0).astype(np.int32),
          "attention_mask": real.astype(np.int32),
          "labels": np.where(real, rng.integers(0, 3, (n, length)), -1).astype(np.int32),
          "weights": np.ones(n, np.float32), "feature_index": np.arange(n, dtype=np.int32)}


def test_feature_batches_are_cut_to_the_global_batch_s_bucket_on_every_host():
  features, buckets, batches = _features(), (4, 8, 16), 12
  full = loader.feature_train_iterator(features, loader.HostLayout(8), seed=3)
  hosts = [loader.feature_train_iterator(features, loader.HostLayout(4, host, 2), seed=3,
                                         length_buckets=buckets) for host in range(2)]
  lengths = set()
  for _ in range(batches):
    whole = next(full)
    parts = [next(it) for it in hosts]
    longest = whole["attention_mask"].sum(axis=1).max()
    length = min(b for b in buckets if b >= longest)
    lengths.add(length)
    assert whole["attention_mask"][:, length:].sum() == 0  # no real token is cut off
    for key, value in whole.items():
      cut = value[:, :length] if value.ndim == 2 else value
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), cut, err_msg=key)
  assert len(lengths) >= 2, lengths  # the data has batches of several buckets


def test_length_buckets_must_end_with_the_features_length():
  with pytest.raises(ValueError, match="must end with the features' length 16"):
    loader.feature_train_iterator(_features(), loader.HostLayout(8), seed=0,
                                  length_buckets=(4, 8))
