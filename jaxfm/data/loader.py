"""Host batches from fixed-shape examples: the layout of the global batch over hosts and shards,
an endless per-epoch reshuffled stream with a checkpointable state, and per-host padded eval
passes. MLM pretraining (`jaxfm.data.mlm_data`) and fine-tuning (`feature_train_iterator`)
both read through it.

Row r of every global batch of G rows comes from shard r // (G / S) of S shards, so the global
batch is the same whatever the host count, and a host reads only the shards its rows come from
(`HostLayout.shards`). Each epoch of a shard is a permutation seeded with (seed, shard, epoch),
so every example of a shard is seen once per epoch of that shard. An iterator's state is the
number of batches consumed plus a fingerprint of the data checked on restore; it is the same on
every host, and since the pipeline is random-access, restoring replays nothing and works with
any worker or host count.

Every batch is a dict of numpy arrays with a leading per-host batch dimension B.
"""

from __future__ import annotations

import dataclasses
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np
from absl import flags

from jaxfm.data import length_groups

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


@dataclasses.dataclass(frozen=True, eq=False)
class HostBatch:
  """Batch number -> this host's batch; picklable for worker processes.

  Row r of global batch j is position p = j * R + r % R of shard v = r // R (R rows per
  shard); position p is example `order(v, epoch)[p % n_v]` of the shard's epoch p // n_v,
  fetched by `fetch(shards, epochs, indices)`. With `lengths` (one shard) the order puts rows
  of similar length into the same global batch (`length_groups.grouped_order`).
  """
  fetch: Callable[[np.ndarray, np.ndarray, np.ndarray], Batch]
  shard_sizes: tuple[int, ...]  # n_v, training examples per shard (0: not read here)
  seed: int
  layout: HostLayout
  lengths: np.ndarray | None = None  # int [n_0]: each row's length, to group batches by

  def __call__(self, batch_number: int) -> Batch:
    shards, offsets = np.divmod(self.layout.rows, self.layout.shard_rows)  # [B], [B]
    sizes = np.asarray(self.shard_sizes)[shards]  # [B]
    epochs, within = np.divmod(batch_number * self.layout.shard_rows + offsets, sizes)
    indices = np.empty_like(within)
    for shard, epoch in set(zip(shards.tolist(), epochs.tolist())):
      here = (shards == shard) & (epochs == epoch)
      order = (length_groups.shuffled_order(int(sizes[here][0]), self.seed, shard, epoch)
               if self.lengths is None
               else length_groups.grouped_order(self.lengths, self.layout.shard_rows, self.seed,
                                                epoch))
      indices[here] = order[within[here]]
    return self.fetch(shards, epochs, indices)


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
  host_batch: HostBatch
  global_lengths: HostBatch  # batch number -> {"length": int [G]}
  buckets: tuple[int, ...]  # ascending; the last is the features' length T

  def __call__(self, batch_number: int) -> Batch:
    return cut_to_bucket(self.host_batch(batch_number),
                         self.global_lengths(batch_number)["length"].max(), self.buckets)


def feature_train_iterator(features: dict[str, np.ndarray], layout: HostLayout, *,
                           seed: int, length_buckets: Sequence[int] = (),
                           group_by_length: bool = False) -> TrainIterator:
  """Endless, per-epoch reshuffled batches of fixed-shape task features, split by host.

  Every host holds all the features (`layout` has one shard); the same global order and
  checkpointable state as pretraining's `train_iterator`. With `length_buckets` (ascending
  lengths ending with the features' length T), every field of length T on axis 1 is cut to
  the shortest bucket that holds the global batch's longest row (by `attention_mask`). With
  `group_by_length` each global batch holds rows of similar length (`length_groups`).
  """
  num_examples = len(next(iter(features.values())))
  lengths = features["attention_mask"].sum(axis=1).astype(np.int32)  # [n]
  grouping = lengths if group_by_length else None
  host_batch = HostBatch(_TakeRows(features), (num_examples,), seed, layout, grouping)
  if len(length_buckets) > 1:
    if length_buckets[-1] != features["attention_mask"].shape[1]:
      raise ValueError(f"length_buckets {tuple(length_buckets)} must end with the features' "
                       f"length {features['attention_mask'].shape[1]}")
    whole_batch = HostLayout(layout.global_batch_size)
    host_batch = _CutToBucket(host_batch, HostBatch(_TakeRows({"length": lengths}),
                                                     (num_examples,), seed, whole_batch, grouping),
                              tuple(length_buckets))
  batches = grain.MapDataset.range(sys.maxsize).map(host_batch)
  fingerprint = {
      "num_examples": num_examples,
      "examples_crc32": zlib.crc32(b"".join(v.tobytes() for _, v in sorted(features.items()))),
      "seed": seed,
      "global_batch_size": layout.global_batch_size,
      **({"group_by_length": 1} if group_by_length else {}),
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
