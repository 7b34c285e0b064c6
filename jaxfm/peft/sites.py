"""Where a PEFT method can act: the encoder's projections, named as Hugging Face names them.

jaxfm fuses query, key and value into one `qkv_kernel` [hidden, 3, heads, head_dim] and keeps
the attention output as `out_kernel` [heads, head_dim, hidden], so a target is a kernel, the
slot of the fused axis (query 0, key 1, value 2; None for a whole kernel) and how many leading
axes are its inputs. A `Site` is one target in one layer scope: `encoder/layer_{i}`, or
`encoder/layers` for the scanned stack (whose leaves lead with a `layers` axis).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

import flax.linen as nn


@dataclasses.dataclass(frozen=True)
class Target:
  name: str  # the config's name for it
  hf_module: str  # the torch module under `encoder.layer.{i}.` in transformers' BERT
  kernel: str  # the jaxfm leaf under the layer scope
  bias: str
  part: int | None  # slot of the fused q/k/v axis, None for a whole kernel
  inputs: int  # how many leading (non-layer) kernel axes are inputs


TARGETS = {t.name: t for t in (
    Target("query", "attention.self.query", "attention/qkv_kernel", "attention/qkv_bias", 0, 1),
    Target("key", "attention.self.key", "attention/qkv_kernel", "attention/qkv_bias", 1, 1),
    Target("value", "attention.self.value", "attention/qkv_kernel", "attention/qkv_bias", 2, 1),
    Target("attention.output", "attention.output.dense", "attention/out_kernel",
           "attention/out_bias", None, 2),
    Target("intermediate", "intermediate.dense", "intermediate/kernel", "intermediate/bias",
           None, 1),
    Target("output", "output.dense", "output/kernel", "output/bias", None, 1),
)}
ALL_LINEAR = "all-linear"  # every projection of every layer (peft's name for it)
# Base modules that may train in full beside an adapter (peft's `modules_to_save`): the config's
# name -> the scope of its params. The pooler is the one a BERT classifier reads and the base
# brings untrained for the task (a sentence-embedding model's pooler never trained at all).
SAVABLE = {"pooler": "encoder/pooler"}

_SCOPE = re.compile(r"^encoder/(layer_(\d+)|layers)$")


def parse_targets(names: str, default: tuple[str, ...]) -> tuple[Target, ...]:
  """'query,value' / 'all-linear' / '' (the method's `default`) -> targets, in table order.

  Raises:
    ValueError: an unknown name.
  """
  wanted = [n.strip() for n in names.split(",") if n.strip()] or list(default)
  if wanted == [ALL_LINEAR]:
    return tuple(TARGETS.values())
  unknown = [n for n in wanted if n not in TARGETS]
  if unknown:
    raise ValueError(f"unknown target modules {unknown}: choose from "
                     f"{', '.join(TARGETS)} or {ALL_LINEAR}")
  return tuple(t for t in TARGETS.values() if t.name in wanted)


def parse_saved(names: str) -> tuple[str, ...]:
  """'pooler' / '' -> the scopes of the base params that train in full.

  Raises:
    ValueError: an unknown name.
  """
  wanted = [n.strip() for n in names.split(",") if n.strip()]
  unknown = [n for n in wanted if n not in SAVABLE]
  if unknown:
    raise ValueError(f"unknown modules {unknown}: choose from {', '.join(SAVABLE)}")
  return tuple(SAVABLE[n] for n in wanted)


@dataclasses.dataclass(frozen=True)
class Site:
  """One target in one layer scope of a parameter tree."""

  scope: str  # encoder/layer_3 or encoder/layers
  target: Target

  @property
  def kernel(self) -> str:
    return f"{self.scope}/{self.target.kernel}"

  @property
  def bias(self) -> str:
    return f"{self.scope}/{self.target.bias}"

  @property
  def adapter(self) -> str:
    """Where the method's params for this site live in the adapter tree."""
    return f"{self.scope}/{self.target.name}"

  @property
  def lead(self) -> int:
    """Leading stacked-layer axes of this scope's leaves (1 for the scanned stack)."""
    return int(self.scope.endswith("/layers"))

  def split_shape(self, kernel_shape: tuple[int, ...]
                  ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """kernel shape -> (layer axes, input axes, output axes), the fused q/k/v axis dropped."""
    lead, inputs = self.lead, self.target.inputs
    outputs = kernel_shape[lead + inputs + (self.target.part is not None):]
    return kernel_shape[:lead], kernel_shape[lead:lead + inputs], outputs

  def part_index(self) -> tuple[Any, ...]:
    """Index of this target's slice in its kernel (and bias): ... the fused axis = part."""
    if self.target.part is None:
      return (Ellipsis,)
    return (slice(None),) * (self.lead + self.target.inputs) + (self.target.part,)

  def bias_index(self) -> tuple[Any, ...]:
    if self.target.part is None:
      return (Ellipsis,)
    return (slice(None),) * self.lead + (self.target.part,)

  def hf_modules(self, num_scanned: int) -> list[str]:
    """Transformers module names (without the model prefix) this site covers."""
    match = _SCOPE.match(self.scope)
    layers = range(num_scanned) if match.group(2) is None else [int(match.group(2))]
    return [f"encoder.layer.{i}.{self.target.hf_module}" for i in layers]


def scope_order(scope: str) -> int:
  """Sort key of a layer scope, bottom first: the scanned stack (-1) holds the bottom layers."""
  return int(_SCOPE.match(scope).group(2) or -1)


def sites(flat: Mapping[str, Any], targets: tuple[Target, ...]) -> list[Site]:
  """Every (layer scope, target) whose kernel `flat` (a flattened param tree) holds."""
  scopes = sorted({m.group(0) for name in flat for m in [_SCOPE.match(name.rsplit("/", 2)[0])]
                   if m}, key=scope_order)
  return [Site(scope, t) for scope in scopes for t in targets if f"{scope}/{t.kernel}" in flat]


def num_scanned(flat: Mapping[str, Any]) -> int:
  """Layers in the scanned stack of a flattened tree (0 without one)."""
  leaf = flat.get("encoder/layers/attention/qkv_kernel")
  return 0 if leaf is None else int(nn.meta.unbox(leaf).shape[0])


def logical_names(leaf: Any) -> tuple[str | None, ...] | None:
  """The logical axis names of a boxed leaf (None for a plain array)."""
  return leaf.names if isinstance(leaf, nn.Partitioned) else None


def boxed_like(like: Any, value: Any, names: tuple[str | None, ...] | None) -> Any:
  """`value` boxed like `like` (the same logical-partitioning box, with `names`) when `like`
  is boxed, as in the abstract init that gives the shardings."""
  return like.replace(value=value, names=names) if isinstance(like, nn.Partitioned) else value


@dataclasses.dataclass(frozen=True)
class EncoderDims:
  """The encoder's sizes, read off its params (what activation hooks are shaped by)."""

  layers: int
  hidden: int
  heads: int
  head_dim: int
  embed: int  # word-embedding width (the hidden size unless factorised)
  like: Any  # a boxed (or plain) leaf to box new params like

  @classmethod
  def of(cls, flat: Mapping[str, Any]) -> EncoderDims:
    """From a flattened task-model param tree (boxed or not)."""
    unrolled = {m.group(2) for name in flat for m in [_SCOPE.match(name.rsplit("/", 2)[0])]
                if m and m.group(2) is not None}
    kernel = next(v for k, v in flat.items() if k.endswith("attention/qkv_kernel"))
    hidden, _, heads, head_dim = nn.meta.unbox(kernel).shape[-4:]
    embed = nn.meta.unbox(flat[WORD_EMBEDDINGS]).shape[-1]
    return cls(num_scanned(flat) + len(unrolled), hidden, heads, head_dim, embed,
               flat[WORD_EMBEDDINGS])


WORD_EMBEDDINGS = "encoder/embeddings/word_embeddings/embedding"
