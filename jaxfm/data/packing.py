"""Packing for fine-tuning: several short features per row at one static length.

Short texts (SST-2, CoNLL sentences: 13 to 20 tokens on average) padded to their batch's
length leave most of a row to padding; packed, a row holds as many features as fit. The plan
is best-fit decreasing: features, longest first, each go into the row whose free space fits
them most tightly, so rows come out nearly full and the plan depends only on the lengths (an
epoch's order is then a shuffle of the rows, as for unpacked features: reproducible from the
seed and epoch, and resumable by the loader's state).

A packed row carries, besides its tokens, `segment_ids` (1, 2, ... per feature, 0 for padding:
the model lets a token attend only within its own feature), `position_ids` (restarting at 0 per
feature) and `cls_positions` (where each feature starts, -1 for an empty slot). Per-feature
fields (labels, weights, feature_index) become [rows, slots] arrays in the same slot order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

Features = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Packing:
  """Rows of `row_length` tokens holding at most `max_per_row` features each."""

  row_length: int
  max_per_row: int

  def plan(self, lengths: np.ndarray) -> np.ndarray:
    """int32 [rows, max_per_row]: the features of each row (their indices into `lengths` [n]),
    -1 for an empty slot. Best-fit decreasing; ties go to the feature listed first."""
    if len(lengths) and int(np.max(lengths)) > self.row_length:
      raise ValueError(f"a feature of {int(np.max(lengths))} tokens does not fit in rows of "
                       f"{self.row_length}")
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[list[int]] = [[] for _ in range(self.row_length + 1)]  # free space -> rows
    open_count = np.zeros(self.row_length + 1, np.int64)  # [free space]: len(open_rows[s])
    for feature in np.argsort(-np.asarray(lengths), kind="stable"):
      length = int(lengths[feature])
      fits = np.flatnonzero(open_count[length:])
      if len(fits):
        row = open_rows[length + fits[0]].pop()
        open_count[length + fits[0]] -= 1
      else:
        row = len(rows)
        rows.append([])
        room.append(self.row_length)
      rows[row].append(int(feature))
      room[row] -= length
      if len(rows[row]) < self.max_per_row and room[row] > 0:
        open_rows[room[row]].append(row)
        open_count[room[row]] += 1
    slots = np.full((len(rows), self.max_per_row), -1, np.int32)
    for row, members in enumerate(rows):
      slots[row, :len(members)] = members
    return slots

  def pack(self, features: Features, fill: Mapping[str, int] | None = None) -> Features:
    """Packs fixed-shape features (each row's real tokens a prefix, by `attention_mask`).

    Fields of shape [n, T] become [rows, row_length] (padding 0), fields of shape [n] become
    [rows, max_per_row] (empty slots `fill[field]`, else 0), and `segment_ids`,
    `position_ids` [rows, row_length] and `cls_positions` [rows, max_per_row] are added.
    """
    mask = features["attention_mask"]  # [n, T]
    n, width = mask.shape
    lengths = mask.sum(axis=1).astype(np.int64)  # [n]
    if not np.array_equal(mask != 0, np.arange(width) < lengths[:, None]):
      raise ValueError("packing needs each feature's real tokens first (attention_mask a prefix)")
    slots = self.plan(lengths)  # [rows, slots]
    filled = slots >= 0
    row_of, slot_of = np.nonzero(filled)  # [m] each, row-major: a row's features in slot order
    feature = slots[filled]  # [m]
    slot_lengths = np.where(filled, lengths[np.maximum(slots, 0)], 0)  # [rows, slots]
    starts = np.cumsum(slot_lengths, axis=1) - slot_lengths  # [rows, slots]
    # One entry per real token: its feature, offset in the feature, and row and column packed.
    counts = lengths[feature]  # [m]
    token_feature = np.repeat(feature, counts)
    token_offset = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    token_row = np.repeat(row_of, counts)
    token_column = np.repeat(starts[filled], counts) + token_offset
    rows = (len(slots), self.row_length)
    packed: Features = {}
    for name, values in features.items():
      if values.shape[:2] == (n, width):
        out = np.zeros(rows + values.shape[2:], values.dtype)
        out[token_row, token_column] = values[token_feature, token_offset]
      elif values.shape == (n,):
        out = np.full(slots.shape, (fill or {}).get(name, 0), values.dtype)
        out[filled] = values[feature]
      else:
        raise ValueError(f"cannot pack field {name!r} of shape {values.shape}: expected "
                         f"[{n}, {width}, ...] (per token) or [{n}] (per feature)")
      packed[name] = out
    packed["segment_ids"] = np.zeros(rows, np.int32)
    packed["segment_ids"][token_row, token_column] = np.repeat(slot_of + 1, counts)
    packed["position_ids"] = np.zeros(rows, np.int32)
    packed["position_ids"][token_row, token_column] = token_offset
    packed["cls_positions"] = np.where(filled, starts, -1).astype(np.int32)
    return packed
