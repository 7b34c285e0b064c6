"""Mixtures (`data.sources`): grain's interleaving rule, weights that hold whatever the sources'
sizes, exact resume, the per-source counters, and the same batches from a prepared directory."""

import sys

import grain
import numpy as np
import pytest

from jaxfm.config import ConfigError, pretrain_defaults, validate_pretrain_data
from jaxfm.data import loader, mlm_data, prepared
from tests.data_helpers import unmasked, write_corpus_files

T, P = 32, 5
WEIGHTS = {"big": 1.0, "small": 3.0}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """A big source (4 files of 40 documents) and a small one (1 file of 12 documents)."""
  big = write_corpus_files(tmp_path_factory.mktemp("big"), seed=1, docs_per_file=40)
  small = write_corpus_files(tmp_path_factory.mktemp("small"), seed=2, docs_per_file=12, files=1)
  return (("big", big, WEIGHTS["big"]), ("small", small, WEIGHTS["small"]))


def _cfg(sources, **overrides):
  cfg = pretrain_defaults()
  cfg.data.update(dict(sources=sources, vocab_size=200, max_seq_length=T,
                       max_predictions_per_seq=P, eval_fraction=0.1, seed=2, num_shards=2))
  cfg.data.update(overrides)
  return cfg.data


@pytest.fixture(scope="module")
def online(sources, tmp_path_factory):
  return mlm_data.build_pretraining_data(_cfg(sources), str(tmp_path_factory.mktemp("tok")),
                                         max_position_embeddings=64)


def _source_of_rows(data: mlm_data.PretrainingData) -> dict[bytes, str]:
  """Each training example's tokens -> the name of its source."""
  out = {}
  for v, start in data.train_starts.items():
    ends = start + np.cumsum(data.source_sizes[v])
    for name, first, end in zip(data.mixture.names, ends - data.source_sizes[v], ends):
      out.update((row.tobytes(), name) for row in data.train.tokens[first:end])
  return out


def _batches(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(want, got):
  for a, b in zip(want, got, strict=True):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_interleaving_is_grains_mix():
  mixture = mlm_data.Mixture(("a", "b", "c"), (3.0, 1.0, 2.0))
  assert mixture.proportions == (3, 1, 2)
  parents = [grain.MapDataset.range(sys.maxsize).map(lambda q, s=s: (s, q)) for s in range(3)]
  mixed = grain.MapDataset.mix(parents, [3, 1, 2])
  positions = np.arange(10_000)
  sources, elements = mixture.select(positions)
  want = np.array([mixed[int(p)] for p in positions])  # [N, 2] (source, element)
  np.testing.assert_array_equal(sources, want[:, 0])
  np.testing.assert_array_equal(elements, want[:, 1])
  for n in (0, 1, 7, 999, 10_000):
    np.testing.assert_array_equal(mixture.counts(n), np.bincount(sources[:n], minlength=3))
  assert mlm_data.Mixture(("a", "b"), (0.7, 0.3)).proportions == (7, 3)
  assert sum(mlm_data.Mixture(("a", "b"), (1 / 3, 2 ** -0.5)).proportions) <= 1 << 20


def test_weights_hold_over_10k_examples_whatever_the_sizes(online):
  sizes = online.source_sizes.sum(axis=0)
  assert sizes[0] > 3 * sizes[1]  # the small source is far smaller, and weighs 3x more
  layout = loader.HostLayout(32, num_shards=2)
  it = online.train_iterator(layout)
  source_of = _source_of_rows(online)
  seen = {name: 0 for name in WEIGHTS}
  batches = 10_000 // 32 + 1
  for batch in _batches(it, batches):
    for row in unmasked(batch):
      seen[source_of[row.tobytes()]] += 1
  n = batches * 32
  for name, weight in WEIGHTS.items():
    share = weight / sum(WEIGHTS.values())
    assert abs(seen[name] - n * share) <= 3 * np.sqrt(n * share * (1 - share)), seen
  # The counters the checkpoints carry are the rows actually drawn.
  assert {k: it.get_state()[f"examples_seen/{k}"] for k in WEIGHTS} == seen


def test_a_resume_mid_epoch_gives_the_same_batches(online):
  layout = loader.HostLayout(8, num_shards=2)
  first = online.train_iterator(layout)
  want = _batches(first, 9)
  resumed = online.train_iterator(layout)
  _batches(resumed, 4)
  state = resumed.get_state()
  again = online.train_iterator(layout)
  again.set_state(state)
  _assert_same(want[4:], _batches(again, 5))
  assert again.get_state() == first.get_state()
  other = mlm_data.Mixture(("big", "small"), (1.0, 1.0))
  reweighted = mlm_data.PretrainingData(**{**online.__dict__, "mixture": other})
  with pytest.raises(ValueError, match="mixture_crc32"):
    reweighted.train_iterator(layout).set_state(state)


def test_one_source_is_the_single_corpus(sources, tmp_path):
  name, files, _ = sources[0]
  single = mlm_data.build_pretraining_data(_cfg((), train_files=files), str(tmp_path / "a"),
                                           max_position_embeddings=64)
  named = mlm_data.build_pretraining_data(_cfg(((name, files, 5.0),)), str(tmp_path / "b"),
                                          max_position_embeddings=64)
  layout = loader.HostLayout(8, num_shards=2)
  _assert_same(_batches(single.train_iterator(layout), 5),
               _batches(named.train_iterator(layout), 5))
  # And the old per-shard stream: HostBatch's order over the shards' examples.
  host_batch = loader.HostBatch(lambda shards, epochs, indices: {"i": indices, "e": epochs},
                                tuple(single.shard_table[:, 0]), 2, layout)
  mixed = mlm_data._MixedHostBatch(lambda shards, epochs, indices: {"i": indices, "e": epochs},
                                   single.source_sizes, single.mixture, 2, layout)
  for j in (0, 3, 40):
    _assert_same([host_batch(j)], [mixed(j)])


@pytest.mark.parametrize("per_host,hosts", [(8, 1), (4, 2)])
def test_a_prepared_mixture_gives_the_online_batches(sources, online, tmp_path, per_host, hosts):
  out = tmp_path / "prepared"
  manifest = prepared.prepare(_cfg(sources), str(out))
  assert [s["name"] for s in manifest["sources"]] == list(WEIGHTS)
  assert [e["sources"] for e in manifest["shards"]] == online.source_sizes.tolist()
  for h in range(hosts):
    layout = loader.HostLayout(per_host, h, hosts, 2)
    disk = prepared.load_prepared(_cfg(sources, prepared=str(out)), None, shards=layout.shards)
    want, got = online.train_iterator(layout), disk.train_iterator(layout)
    _assert_same(_batches(want, 6), _batches(got, 6))
    assert got.get_state() == want.get_state()
  # The weights are the run's to choose; the names must be the prepared ones.
  default = prepared.load_prepared(_cfg((), prepared=str(out)), None)
  assert default.mixture == online.mixture
  reweighted = tuple((name, files, new) for (name, files, _), new in zip(sources, (2.0, 1.0)))
  assert prepared.load_prepared(_cfg(reweighted, prepared=str(out)), None).mixture.weights == (
      2.0, 1.0)
  renamed = (("wiki", *sources[0][1:]), sources[1])
  with pytest.raises(prepared.SettingsMismatch, match="data.sources=.*'wiki'"):
    prepared.load_prepared(_cfg(renamed, prepared=str(out)), None)


def test_sources_replace_train_files():
  cfg = pretrain_defaults()
  cfg.data.sources = (("a", "a/*.txt", 1.0),)
  validate_pretrain_data(cfg)
  cfg.data.train_files = "b.txt"
  with pytest.raises(ConfigError, match="data.sources replaces data.train_files"):
    validate_pretrain_data(cfg)
