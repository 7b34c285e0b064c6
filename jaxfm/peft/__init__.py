"""Parameter-efficient fine-tuning: a frozen base, a small trainable tree (adapter + new heads).

One module per method (`lora`, `ia3`), each with `init(site, kernel, rng, settings)` (the
site's adapter params, on the kernel's logical axes, so they shard like the base) and
`fold(site, flat, adapter, settings)` (the adapted params). `Plan` splits a task model's
params into the frozen base (what `init_from` provided) and the trainable tree
`{'adapter': ..., 'head': ...}` (the adapter and everything the base lacked: the task head),
and `Plan.combine` rebuilds the model's params from the two. The train state holds only the
trainable tree; the base goes to the jitted steps as an argument with its own shardings, never
as a constant inside the executable.

Methods that act on activations rather than on weights (prefix and prompt tuning, bottleneck
adapters, LoRA with input dropout) need a model hook: `SelfAttention` taking per-layer key and
value prefixes, `Embeddings` taking prepended input embeddings, and the projections as
interceptable module methods. They are not here yet.
"""

from __future__ import annotations

import dataclasses
import hashlib
from types import ModuleType
from typing import Any, Mapping

import jax
import numpy as np

from jaxfm.peft import ia3, lora
from jaxfm.peft.sites import ALL_LINEAR, TARGETS, Site, Target, num_scanned, parse_targets, sites
from jaxfm.trees import flatten, unflatten

__all__ = ["ALL_LINEAR", "METHODS", "TARGETS", "Method", "Plan", "Settings", "Site", "Target",
           "base_sha256", "num_scanned", "parse_targets", "sites"]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  peft_type: str  # huggingface/peft's name
  module: ModuleType  # with init(site, kernel, rng, settings) and fold(site, flat, adapter, ...)
  default_targets: tuple[str, ...]  # peft's defaults for BERT


METHODS = {m.name: m for m in (
    Method("lora", "LORA", lora, ("query", "value")),
    Method("ia3", "IA3", ia3, ("key", "value", "output")),
)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `peft` config section, typed."""

  method: str
  rank: int = 8
  alpha: float = 8.0
  dropout: float = 0.0
  rslora: bool = False
  target_modules: str = ""

  @classmethod
  def of(cls, section: Mapping[str, Any]) -> Settings:
    return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})

  @property
  def targets(self) -> tuple[Target, ...]:
    return parse_targets(self.target_modules, METHODS[self.method].default_targets)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which params of a task model train and how the adapter changes the frozen rest."""

  settings: Settings
  base_names: frozenset[str]  # flattened names of the frozen params (what the base provides)

  @property
  def method(self) -> Method:
    return METHODS[self.settings.method]

  def sites(self, params: Any) -> list[Site]:
    return sites(flatten(params), self.settings.targets)

  def frozen(self, params: Any) -> Any:
    """The frozen part of a full param tree (boxed or not)."""
    return unflatten({k: v for k, v in flatten(params).items() if k in self.base_names})

  def trainable(self, params: Any, rng: jax.Array) -> dict[str, Any]:
    """{'adapter': fresh adapter params, 'head': `params` the base lacks (boxed or not)}."""
    flat = flatten(params)
    adapter = {}
    for index, site in enumerate(sites(flat, self.settings.targets)):
      adapter[site.adapter] = self.method.module.init(
          site, flat[site.kernel], jax.random.fold_in(rng, index), self.settings)
    head = {k: v for k, v in flat.items() if k not in self.base_names}
    return {"adapter": unflatten(adapter), "head": unflatten(head)}

  def combine(self, trainable: Mapping[str, Any], frozen: Any) -> Any:
    """The task model's params: the frozen base with the adapter folded in, plus the head.
    Also the merged model for export (base and adapter as one set of weights)."""
    flat = {**flatten(frozen), **flatten(trainable["head"])}
    adapter = flatten(trainable["adapter"])
    for site in sites(flat, self.settings.targets):
      own = {k.rsplit("/", 1)[1]: v for k, v in adapter.items()
             if k.rsplit("/", 1)[0] == site.adapter}
      self.method.module.fold(site, flat, own, self.settings)
    return unflatten(flat)


def base_sha256(frozen: Any) -> str:
  """sha256 over the frozen params' names, dtypes, shapes and bytes, in name order: what an
  adapter was trained against (the layer layout is the caller's to fix)."""
  digest = hashlib.sha256()
  for name, value in sorted(flatten(frozen).items()):
    array = np.ascontiguousarray(np.asarray(value))
    digest.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()
