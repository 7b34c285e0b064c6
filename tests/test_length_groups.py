"""Length-grouped fine-tuning batches and the length buckets chosen for them."""

import itertools

import numpy as np

from jaxfm.data import length_groups, loader


def _lengths(n=2000, seed=0):
  # Short sentences mostly, a long tail: the shape of SST-2's or CoNLL's token counts.
  return np.clip(np.random.default_rng(seed).lognormal(3.0, 0.5, n), 4, 128).astype(np.int32)


def test_grouped_order_is_a_fresh_permutation_per_epoch_of_similar_length_batches():
  lengths, batch = _lengths(), 32
  orders = [length_groups.grouped_order(lengths, batch, seed=1, epoch=e) for e in (0, 0, 1)]
  assert sorted(orders[0].tolist()) == list(range(len(lengths)))
  np.testing.assert_array_equal(orders[0], orders[1])
  assert (orders[0] != orders[2]).any()
  spread = lambda order: np.mean([np.ptp(lengths[order[i:i + batch]])
                                  for i in range(0, len(order), batch)])
  random = np.random.default_rng([1, 0, 0]).permutation(len(lengths))
  assert spread(orders[0]) < spread(random) / 4


def test_chosen_buckets_compute_the_fewest_tokens_of_any_choice():
  longest = np.random.default_rng(2).integers(5, 128, 300)

  def tokens(buckets):
    return sum(next(b for b in buckets if b >= x) for x in longest)
  candidates = sorted({int(-(-x // 8) * 8) for x in longest} | {128})
  for k in (1, 2, 3):
    chosen = length_groups.choose_buckets(longest, 128, k, 8)
    assert chosen[-1] == 128 and len(chosen) <= k and all(b % 8 == 0 for b in chosen)
    best = min(tokens(c + (128,)) for r in range(k) for c in itertools.combinations(
        [c for c in candidates if c < 128], r))
    assert tokens(chosen) == best


def test_a_compile_cost_per_bucket_trades_lengths_against_the_tokens_they_save():
  longest = np.random.default_rng(3).integers(5, 128, 300)
  def tokens(buckets):
    return sum(next(b for b in buckets if b >= x) for x in longest)
  candidates = sorted({int(-(-x // 8) * 8) for x in longest} - {128})
  for cost in (0.0, 500.0, 3000.0, 1e9):
    chosen = length_groups.choose_buckets(longest, 128, 4, 8, bucket_cost=cost)
    best = min(tokens(c + (128,)) + cost * (r + 1)
               for r in range(4) for c in itertools.combinations(candidates, r))
    assert tokens(chosen) + cost * len(chosen) == best
  assert length_groups.choose_buckets(longest, 128, 4, 8, bucket_cost=1e9) == (128,)
  # auto_buckets: a compile costs the same tokens per run; a longer run affords more lengths.
  lengths = _lengths()
  few, many = (length_groups.auto_buckets(lengths, 32, 0, False, 128, 4, 8, steps, 2e5)
               for steps in (60, 6000))
  assert len(few) < len(many) == 4
  assert length_groups.compile_cost_tokens("auto", "tpu") > length_groups.compile_cost_tokens(
      "auto", "cpu") > 0 == length_groups.compile_cost_tokens("auto", "gpu")
  assert length_groups.compile_cost_tokens("1000", "tpu") == 1000


def test_grouping_and_auto_buckets_cut_the_padding():
  lengths, batch = _lengths(), 32
  ungrouped = length_groups.batch_longest(lengths, batch, 0, grouped=False)
  grouped = length_groups.batch_longest(lengths, batch, 0, grouped=True)
  full = length_groups.padding_share(lengths, batch, 0, (128,), grouped=False)
  plain = length_groups.padding_share(
      lengths, batch, 0, length_groups.choose_buckets(ungrouped, 128, 4, 8), grouped=False)
  auto = length_groups.padding_share(
      lengths, batch, 0, length_groups.choose_buckets(grouped, 128, 4, 8), grouped=True)
  assert auto < 0.6 * plain and plain < 0.6 * full, (auto, plain, full)


def test_grouped_train_iterator_covers_each_row_once_per_epoch_and_resumes():
  lengths = _lengths(n=96)
  width = 128
  mask = (np.arange(width)[None] < lengths[:, None]).astype(np.int32)  # [n, width]
  features = {"attention_mask": mask, "row": np.arange(96, dtype=np.int32)}
  layout = loader.HostLayout(32)
  it = loader.feature_train_iterator(features, layout, seed=3, length_buckets=(32, 64, 128),
                                     group_by_length=True)
  epoch = [next(it) for _ in range(3)]
  assert sorted(np.concatenate([b["row"] for b in epoch]).tolist()) == list(range(96))
  for b in epoch:  # cut to the shortest bucket that holds the batch's longest row
    assert b["attention_mask"].shape[1] == next(x for x in (32, 64, 128)
                                                if x >= lengths[b["row"]].max())
  state = it.get_state()
  again = loader.feature_train_iterator(features, layout, seed=3, length_buckets=(32, 64, 128),
                                        group_by_length=True)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["row"], next(it)["row"])
