"""Corpus shards: hosts read only their shards, and the global batch ignores the host count."""

import numpy as np
import pytest

from jaxfm.config import pretrain_defaults
from jaxfm.data import loader, mlm_data
from jaxfm.data.corpus import CorpusError
from tests.data_helpers import unmasked, write_corpus_files

T, P = 32, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Four files of random-word documents: the glob."""
  return write_corpus_files(tmp_path_factory.mktemp("sharded"), seed=1, docs_per_file=40)


def _cfg(train_files: str, num_shards: int, tokenizer: str = ""):
  cfg = pretrain_defaults().data
  cfg.update(dict(train_files=train_files, vocab_size=200, max_seq_length=T, tokenizer=tokenizer,
                  max_predictions_per_seq=P, eval_fraction=0.1, seed=2, num_shards=num_shards))
  return cfg


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tok") / "tokenizer")
  mlm_data.build_pretraining_data(_cfg(corpus, 1), folder, max_position_embeddings=64)
  return folder


def test_layout_rows_and_shards():
  # 4 hosts x 3 rows, 2 shards of 6 rows: hosts 0-1 read shard 0, hosts 2-3 shard 1.
  layouts = [loader.HostLayout(3, h, 4, 2) for h in range(4)]
  assert [list(l.shards) for l in layouts] == [[0], [0], [1], [1]]
  assert [list(layouts[0].readers(v)) for v in (0, 1)] == [[0, 1], [2, 3]]
  # 2 hosts x 6 rows, 3 shards of 4 rows: shard 1 straddles both hosts.
  layouts = [loader.HostLayout(6, h, 2, 3) for h in range(2)]
  assert [list(l.shards) for l in layouts] == [[0, 1], [1, 2]]
  assert list(layouts[0].readers(1)) == [0, 1]
  assert list(layouts[1].eval_indices(1, 5)) == [1, 3]
  with pytest.raises(ValueError, match="num_shards=5"):
    loader.HostLayout(6, 0, 2, 5)


@pytest.mark.parametrize("num_shards,hosts,per_host", [(2, 2, 6), (4, 2, 4), (3, 2, 6),
                                                       (2, 4, 3)])
def test_hosts_reading_their_shards_make_the_one_host_batches(corpus, tokenizer_dir, num_shards,
                                                              hosts, per_host):
  cfg = _cfg(corpus, num_shards, tokenizer=tokenizer_dir)
  whole = mlm_data.build_pretraining_data(cfg, None, max_position_embeddings=64)
  one = whole.train_iterator(loader.HostLayout(hosts * per_host, num_shards=num_shards))
  want = [next(one) for _ in range(12)]
  got = [[] for _ in want]
  for h in range(hosts):
    layout = loader.HostLayout(per_host, h, hosts, num_shards)
    part = mlm_data.build_pretraining_data(cfg, None, max_position_embeddings=64,
                                         shards=layout.shards)
    if num_shards >= hosts:  # whole files per shard: the host opened only its own
      assert part.counters["corpus/files"] == sum(k % num_shards in layout.shards
                                                  for k in range(4))
    assert part.counters["shards/read"] == len(layout.shards) < num_shards
    it = part.train_iterator(layout)
    for j in range(len(want)):
      got[j].append(next(it))
  for j, batch in enumerate(want):
    for k in batch:
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got[j]]), batch[k], err_msg=k)


def test_every_example_once_per_shard_epoch(corpus, tokenizer_dir):
  data = mlm_data.build_pretraining_data(_cfg(corpus, 2, tokenizer=tokenizer_dir), None,
                                       max_position_embeddings=64)
  layout = loader.HostLayout(8, num_shards=2)  # 4 rows per shard
  it = data.train_iterator(layout)
  sizes = data.shard_table[:, 0]
  seen = {0: [], 1: []}
  for _ in range(2 * -(-int(sizes.max()) // 4)):
    rows = unmasked(next(it))
    seen[0] += [r.tobytes() for r in rows[:4]]
    seen[1] += [r.tobytes() for r in rows[4:]]
  for v in (0, 1):
    start = data.train_starts[v]
    shard = {r.tobytes() for r in data.train.tokens[start:start + sizes[v]]}
    first, second = seen[v][:sizes[v]], seen[v][sizes[v]:2 * sizes[v]]
    assert set(first) == shard == set(second) and len(set(first)) == sizes[v]  # once per epoch
    assert first != second  # reshuffled


@pytest.mark.parametrize("num_shards,hosts,per_host", [(2, 2, 4), (3, 2, 6), (1, 3, 4)])
def test_eval_examples_once_across_hosts(corpus, tokenizer_dir, num_shards, hosts, per_host):
  data = mlm_data.build_pretraining_data(_cfg(corpus, num_shards, tokenizer=tokenizer_dir), None,
                                       max_position_embeddings=64)
  layouts = [loader.HostLayout(per_host, h, hosts, num_shards) for h in range(hosts)]
  count = data.num_eval_batches(layouts[0])
  found = []
  for layout in layouts:
    batches = list(data.eval_batches(layout))
    assert len(batches) == count  # every host runs the same number of eval steps
    for batch in batches:
      real = batch["masked_weights"].sum(axis=1) > 0
      found += [r.tobytes() for r in unmasked(batch)[real]]
  assert sorted(found) == sorted(r.tobytes() for r in data.eval.tokens)
  assert len(data.eval) == data.shard_table[:, 1].sum() > 0


def test_documents_are_dealt_when_files_are_few(corpus, tokenizer_dir):
  first_file = corpus.replace("*", "part-0")
  cfg = _cfg(first_file, 2, tokenizer=tokenizer_dir)
  halves = [mlm_data.build_pretraining_data(cfg, None, max_position_embeddings=64, shards=[v])
            for v in (0, 1)]
  for v, half in enumerate(halves):
    c = half.counters
    assert c["corpus/documents"] == 40 and c["corpus/documents_of_other_shards"] == 20
    assert c["train/documents"] + c["eval/documents"] == 20
  whole = mlm_data.build_pretraining_data(cfg, None, max_position_embeddings=64)
  np.testing.assert_array_equal(
      whole.train.tokens, np.concatenate([h.train.tokens for h in halves]))


def test_tokenizer_comes_from_shard_zero(corpus, tmp_path):
  folder = str(tmp_path / "tokenizer")
  with pytest.raises(CorpusError, match="did not read shard 0"):
    mlm_data.build_pretraining_data(_cfg(corpus, 2), folder, max_position_embeddings=64, shards=[1])
  first = mlm_data.build_pretraining_data(_cfg(corpus, 2), folder, max_position_embeddings=64,
                                        shards=[0])
  second = mlm_data.build_pretraining_data(_cfg(corpus, 2), folder, max_position_embeddings=64,
                                         shards=[1])  # loads what the shard-0 host saved
  assert first.tokenizer.vocab_size == second.tokenizer.vocab_size
  whole = mlm_data.build_pretraining_data(_cfg(corpus, 2), str(tmp_path / "again"),
                                        max_position_embeddings=64)
  assert (whole.tokenizer.backend.get_vocab() == first.tokenizer.backend.get_vocab())


def test_a_shard_without_examples_is_an_error(corpus, tokenizer_dir):
  one_file = corpus.replace("*", "part-0")
  with pytest.raises(CorpusError, match=r"shard\(s\) \[\d+"):
    mlm_data.build_pretraining_data(_cfg(one_file, 64, tokenizer=tokenizer_dir), None,
                                  max_position_embeddings=64)
