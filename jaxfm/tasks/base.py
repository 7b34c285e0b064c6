"""What every task kind shares: the `TaskKind` record the registry holds, `TaskSplit` (a split's
examples and device arrays, with the per-host padded eval batcher), row errors that name where
a bad input row is, JSONL inputs, and the model call that losses and predictions make.

Readers never drop a bad input row silently: by default they raise an error naming where the
row is (`file:line`, or the question id); with `on_error="skip"` they skip it, count it and
log the count. Converters take a `tokenizers`-style tokenizer (`Tokenizer.from_file(...)` or
`BertWordPieceTokenizer(vocab.txt)`) that must not truncate or pad on its own, and return
dicts of fixed-shape numpy arrays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
from typing import Any, Callable, Iterator, Sequence, TextIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from jaxfm.data import loader
from jaxfm.data.packing import Packing
from jaxfm.models import BertConfig
from jaxfm.train.flops import encoder_flops_per_token
from jaxfm.train.step import Batch, LossFn, Sums

Features = dict[str, np.ndarray]
BatchSpec = dict[str, tuple[tuple[int, ...], str]]  # field -> (per-example shape, dtype)
INPUTS = ("input_ids", "token_type_ids", "attention_mask")
# What packed rows (`jaxfm.data.packing`) add: per token, then per example slot.
PACKED_TOKEN_INPUTS = ("segment_ids", "position_ids")
PACKED_SLOT_INPUTS = ("cls_positions",)
ON_ERROR = ("raise", "skip")


# ---------------------------------------------------------------- input rows

class RowError(ValueError):
  """A bad input row; `where` (e.g. `file:line`) overrides the location the reader gives it."""

  def __init__(self, message: str, where: str | None = None):
    super().__init__(message)
    self.where = where


class RowPolicy:
  """Turns bad rows into errors naming where they are, or (on_error="skip") counts them.

  Usage: `with policy.at(f"{path}:{line}"): examples.append(parse(line))`, then
  `policy.done()`.
  """

  def __init__(self, source: str, on_error: str = "raise"):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.source = source
    self.on_error = on_error
    self.skipped: list[str] = []

  @contextlib.contextmanager
  def at(self, where: str) -> Iterator[None]:
    """Runs the parsing of one row; a RowError inside is re-raised with its location, or counted."""
    try:
      yield
    except RowError as error:
      message = f"{error.where or where}: {error}"
      if self.on_error == "raise":
        raise RowError(message) from None
      self.skipped.append(message)

  def done(self) -> None:
    """Logs how many rows were skipped, with the first reason."""
    if self.skipped:
      logging.warning("%s: skipped %d bad rows (on_error='skip'); the first: %s",
                      self.source, len(self.skipped), self.skipped[0])


def token_ids(tokenizer: Any, *tokens: str) -> list[int]:
  """Ids of special tokens; checks that the tokenizer neither truncates nor pads by itself."""
  if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
    raise ValueError("the tokenizer truncates or pads by itself (its tokenizer.json says so); "
                     "call tokenizer.no_truncation() and tokenizer.no_padding() first")
  ids = [tokenizer.token_to_id(token) for token in tokens]
  if None in ids:
    raise ValueError(f"the tokenizer's vocabulary lacks one of {tokens}")
  return ids


def open_text(path: str, newline: str | None = None) -> TextIO:
  """A task file as text (UTF-8, a byte-order mark dropped): local, or on an object store
  (e.g. gs://, through etils epath; read whole, as the readers read every file whole)."""
  if "://" not in path:
    return open(path, encoding="utf-8-sig", newline=newline)
  return io.StringIO(epath.Path(path).read_bytes().decode("utf-8-sig"), newline=newline)


def jsonl_objects(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
  """(`file:line`, object) for each non-blank line of a JSONL file of inputs to predict;
  errors name the line."""
  with open_text(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
      yield f"{path}:{number}", row


def json_field(row: dict[str, Any], name: str, where: str, kind: type) -> Any:
  """`row[name]`, which must be a non-empty `kind`; the error names `where`."""
  if not isinstance(row.get(name), kind) or not row[name]:
    raise ValueError(f"{where}: field {name!r} is missing, empty or not a {kind.__name__}")
  return row[name]


# ---------------------------------------------------------------- model calls

def apply_kwargs(rng: jax.Array | None) -> dict[str, Any]:
  """`model.apply` keywords: dropout from `rng`, or none (deterministic) without one."""
  if rng is None:
    return dict(deterministic=True)
  return dict(deterministic=False, rngs={"dropout": rng})


def encode(model: nn.Module, params: Any, batch: Batch, rng: jax.Array | None,
           packed_inputs: tuple[str, ...] = PACKED_TOKEN_INPUTS) -> Any:
  """The task model's output on the batch's (input_ids, token_type_ids, attention_mask), and
  in packed batches the `packed_inputs` fields too (keywords)."""
  packed = {name: batch[name] for name in packed_inputs if name in batch}
  return model.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                     batch["attention_mask"], **packed, **apply_kwargs(rng))


def token_weights(batch: Batch) -> jax.Array:
  """Each token's example weight, [b, t] (or [b, 1] to broadcast): the row's `weights` [b],
  or in packed rows the weight [b, slots] of the token's example (0 on padding)."""
  if "segment_ids" not in batch:
    return batch["weights"][:, None]
  segments = batch["segment_ids"]  # [b, t]: 1, 2, ... per example, 0 = padding
  weights = jnp.take_along_axis(batch["weights"], jnp.maximum(segments - 1, 0), axis=1)
  return jnp.where(segments > 0, weights, 0.0)


def tokens_per_example(x: jax.Array, cls_positions: jax.Array) -> jax.Array:
  """Per-token outputs of packed rows, x [b, t, ...], as each slot's own tokens
  [b, slots, t, ...]: position j of slot s is row position cls_positions[b, s] + j (clipped to
  the row; the positions past an example's end belong to the next one or to padding)."""
  t = x.shape[1]
  positions = jnp.clip(cls_positions[:, :, None] + jnp.arange(t), 0, t - 1)  # [b, slots, t]
  return jax.vmap(lambda row, where: row[where])(x, positions)


def predict_outputs(model: nn.Module, names: tuple[str, ...],
                    packs: str = "") -> Callable[[Any, Batch], Sums]:
  """`(params, batch) -> {name: model output}` without dropout, plus the batch's
  `feature_index` [b] (-1 for padding) so outputs can be matched to their features.

  Packed batches give outputs per example slot, [b, slots, ...] with `feature_index`
  [b, slots]: the model's own (`packs="examples"`), or its per-token outputs cut into each
  example's tokens (`packs="tokens"`, `tokens_per_example`).
  """
  def predict(params: Any, batch: Batch) -> Sums:
    out = encode(model, params, batch, None, _packed_inputs(packs))
    out = out if isinstance(out, tuple) else (out,)
    if packs == "tokens" and "cls_positions" in batch:
      out = tuple(tokens_per_example(x, batch["cls_positions"]) for x in out)
    return {"feature_index": batch["feature_index"], **dict(zip(names, out, strict=True))}
  return predict


def _packed_inputs(packs: str) -> tuple[str, ...]:
  """The packing fields a model reads: the examples' [CLS] positions too when its outputs are
  per example."""
  return PACKED_TOKEN_INPUTS + (PACKED_SLOT_INPUTS if packs == "examples" else ())


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Mean loss per weighted target (and token/example accuracy where the loss counts it)."""
  weight = max(sums["weight"], 1.0)
  out = {"loss": sums["loss_sum"] / weight}
  if "correct" in sums:
    out["target_accuracy"] = sums["correct"] / weight
  return out


# ---------------------------------------------------------------- splits and kinds

@dataclasses.dataclass(frozen=True)
class TaskSplit:
  """One split: examples, all features, and the names of the fields the device needs.

  Host-side features (offsets, word maps) stay here; each device row carries `weights`
  (0 = padding) and `feature_index` (-1 = padding), so eval outputs match their features.
  With `packing` a device row holds several features (`jaxfm.data.packing`), and `weights` and
  `feature_index` are [rows, slots].
  """

  examples: list[Any]
  features: Features
  device_fields: tuple[str, ...]
  packing: Packing | None = None

  def __len__(self) -> int:
    """Device rows: one per feature, or the packed rows."""
    return len(self._device_rows["input_ids"])

  def device_arrays(self) -> Features:
    """The device fields plus `weights` (1) and `feature_index` (row number), per feature or
    packed (each call a fresh copy)."""
    return {k: v.copy() for k, v in self._device_rows.items()}

  def row_lengths(self) -> np.ndarray:
    """int [rows]: the real tokens of each device row."""
    return self._device_rows["attention_mask"].sum(axis=1)

  @functools.cached_property
  def _device_rows(self) -> Features:
    n = len(self.features["input_ids"])
    rows = {**{k: self.features[k] for k in self.device_fields},
            "weights": np.ones(n, np.float32), "feature_index": np.arange(n, dtype=np.int32)}
    if self.packing is None:
      return rows
    packed = self.packing.pack(rows, {"feature_index": -1})
    logging.info("packed %d features into %d rows of %d tokens (%.1f per row)", n,
                 len(packed["input_ids"]), self.packing.row_length, n / len(packed["input_ids"]))
    return packed

  def eval_batches(self, batch_size_per_host: int, shard_index: int, shard_count: int,
                   length_buckets: Sequence[int] = ()) -> Iterator[Features]:
    """This host's rows `shard_index::shard_count` in batches; every host yields the same
    number of batches, the last ones padded with `weights` 0 and `feature_index` -1.

    With `length_buckets` (ascending, ending with the features' length) the rows go by
    length, shortest first, and each batch is cut to the shortest bucket that holds the
    longest row of that batch on any host (`loader.cut_to_bucket`).
    """
    arrays = self._device_rows  # indexed below, so each batch is a copy
    lengths = self.row_lengths()  # [n]
    cut = len(length_buckets) > 1
    order = np.argsort(lengths, kind="stable") if cut else np.arange(len(self))
    shares = [order[host::shard_count] for host in range(shard_count)]
    for window, fill in loader.padded_eval_windows([len(s) for s in shares], shard_index,
                                                   batch_size_per_host):
      rows = shares[shard_index][window]
      batch = {k: v[np.concatenate([rows, np.zeros(fill, int)])] for k, v in arrays.items()}
      batch["weights"][len(rows):] = 0.0
      batch["feature_index"][len(rows):] = -1
      if cut:
        longest = max(lengths[share[window]].max(initial=1) for share in shares)
        batch = loader.cut_to_bucket(batch, longest, length_buckets)
      yield batch

  def num_eval_batches(self, batch_size_per_host: int, shard_count: int) -> int:
    """Batches `eval_batches` yields on every host."""
    shares = [len(range(host, len(self), shard_count)) for host in range(shard_count)]
    return loader.num_padded_batches(shares, batch_size_per_host)


@dataclasses.dataclass(frozen=True)
class TaskKind:
  """What differs between fine-tuning task kinds; `jaxfm.tasks.TASKS` holds one per kind.

  Attributes:
    model: (architecture, label names | None) -> the Flax task model (`jaxfm.models.heads`).
    loss: model -> `LossFn`.
    outputs: names of the model's outputs in eval/predict results.
    labels: max_seq_length -> the label fields the loss reads besides `INPUTS`.
    validate: checks the config fields this kind reads (a `ConfigError` names the field).
    read: (data config, path, label names | None) -> labelled examples.
    read_unlabelled: (data config, JSONL path, label names) -> examples to predict.
    label_vocab: examples -> label names (None: the task has no label vocabulary).
    convert: (examples, tokenizer, data config, label names) -> features.
    score: (split, outputs, label names, data config) -> metrics.
    predictions: (split, outputs, label names, data config) -> one JSON row per example.
    main_metric: the default `train.best_metric`.
    reads_tfds: whether `data.tfds_name` may replace the files.
    flops_per_token: (architecture, sequence length) -> training FLOPs per token.
    packs: how the model reads packed rows (`data.packing`): "examples" (one output per
      example, from its [CLS] position), "tokens" (per-token outputs and labels), or "" (not
      packable: `data.packing` is refused).
  """

  model: Callable[[BertConfig, Sequence[str] | None], nn.Module]
  loss: Callable[[nn.Module], LossFn]
  outputs: tuple[str, ...]
  labels: Callable[[int], BatchSpec]
  validate: Callable[[ml_collections.ConfigDict], None]
  read: Callable[..., list[Any]]
  read_unlabelled: Callable[..., list[Any]]
  label_vocab: Callable[[Sequence[Any]], list[str]] | None
  convert: Callable[..., Features]
  score: Callable[..., dict[str, float]]
  predictions: Callable[..., list[dict[str, Any]]]
  main_metric: str
  reads_tfds: bool = False
  flops_per_token: Callable[[BertConfig, int], float] = encoder_flops_per_token
  packs: str = ""

  @property
  def device_fields(self) -> tuple[str, ...]:
    """The feature arrays the device needs (besides `weights` / `feature_index`)."""
    return (*INPUTS, *self.labels(0))

  def batch_spec(self, seq_len: int, slots: int = 0) -> BatchSpec:
    """Per-row (shape, dtype) of every field of this kind's batches; with `slots`, of packed
    rows holding up to that many examples (per-example fields become [slots])."""
    spec = {**{name: ((seq_len,), "int32") for name in INPUTS},
            "weights": ((), "float32"), "feature_index": ((), "int32"), **self.labels(seq_len)}
    if not slots:
      return spec
    return {**{k: ((slots,), dtype) if shape == () else (shape, dtype)
               for k, (shape, dtype) in spec.items()},
            **{name: ((seq_len,), "int32") for name in PACKED_TOKEN_INPUTS},
            **{name: ((slots,), "int32") for name in PACKED_SLOT_INPUTS}}
