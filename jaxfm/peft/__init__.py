"""Parameter-efficient fine-tuning: a frozen base, a small trainable tree (adapter + new heads).

Methods that change weights (`lora`, `adalora`, `ia3`) have `init(site, kernel, rng, settings)` (the
site's adapter params, on the kernel's logical axes, so they shard like the base) and
`fold(site, flat, adapter, settings)` (the adapted params). Methods that act on activations
(`prompt`, `prefix`, `adapters` for houlsby / pfeiffer) have `init(flat, rng, settings,
text_ids)` and `hooks(adapter, settings, dims)`: the model inputs that `Plan.combine` puts
under `encoder/peft`, where `jaxfm.models.encoder.BertEncoder` reads them. `Plan` splits a task
model's params into the frozen base (what `init_from` provided) and the trainable tree
`{'adapter': ..., 'head': ...}` (the adapter, everything the base lacked: the task head, and the
base modules named in `peft.modules_to_save`, which train in full), and `Plan.combine` rebuilds
the model's params from the two. A method may also add a term to the training loss
(`Plan.penalty`) and wrap the run's optimiser (`Plan.optimizer`): AdaLoRA's orthogonality
regulariser and rank allocator. The train state holds only the
trainable tree; the base goes to the jitted steps as an argument with its own shardings, never
as a constant inside the executable.

LoRA with dropout on its input (`peft.dropout` > 0) trains through a hook too, `encoder/peft/lora`
(its path beside the projections, see `jaxfm.peft.lora`), and still folds for export.
"""

from __future__ import annotations

import dataclasses
import hashlib
from types import ModuleType
from typing import Any, Callable, Mapping

import jax
import numpy as np
import optax

from jaxfm.models.encoder import PEFT
from jaxfm.peft import adalora, adapters, ia3, lora, prefix, prompt
from jaxfm.peft.sites import (ALL_LINEAR, SAVABLE, TARGETS, EncoderDims, Site, Target,
                              num_scanned, parse_saved, parse_targets, sites)
from jaxfm.trees import flatten, unflatten

__all__ = ["ALL_LINEAR", "METHODS", "SAVABLE", "TARGETS", "EncoderDims", "Method", "Plan",
           "Settings", "Site", "Target", "base_sha256", "num_scanned", "parse_saved",
           "parse_targets", "sites"]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  peft_type: str  # huggingface/peft's name ('' where peft lacks the method)
  module: ModuleType  # init and fold (weight methods) or init and hooks (activation methods)
  default_targets: tuple[str, ...] = ()  # peft's defaults for BERT (weight methods)

  @property
  def folds(self) -> bool:
    """Whether it changes the base's weights, so that it has a merged form."""
    return hasattr(self.module, "fold")


METHODS = {m.name: m for m in (
    Method("lora", "LORA", lora, ("query", "value")),
    Method("adalora", "ADALORA", adalora, ("query", "value")),
    Method("ia3", "IA3", ia3, ("key", "value", "output")),
    Method("prompt", "PROMPT_TUNING", prompt),
    Method("prefix", "PREFIX_TUNING", prefix),
    Method("houlsby", "", adapters),
    Method("pfeiffer", "", adapters),
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
  modules_to_save: str = ""  # base modules that train in full (`SAVABLE`)
  num_virtual_tokens: int = 20  # prompt, prefix
  prompt_init_text: str = ""  # prompt: start from these words' embeddings ('' = sampled)
  prefix_projection: bool = False  # prefix: reparameterise through peft's MLP
  reduction_factor: int = 16  # houlsby, pfeiffer: bottleneck = hidden / reduction_factor
  # adalora, with peft's names (see `jaxfm.peft.adalora`): ranks, schedule, EMAs, regulariser.
  init_r: int = 12
  target_r: int = 8
  tinit: int = 0
  tfinal: int = 0
  deltaT: int = 1  # pylint: disable=invalid-name
  beta1: float = 0.85
  beta2: float = 0.85
  orth_reg_weight: float = 0.5

  @classmethod
  def of(cls, section: Mapping[str, Any]) -> Settings:
    # Fields a run's config.json predates take their defaults.
    return cls(**{f.name: section.get(f.name, f.default) for f in dataclasses.fields(cls)})

  @property
  def targets(self) -> tuple[Target, ...]:
    return parse_targets(self.target_modules, METHODS[self.method].default_targets)

  @property
  def saved_scopes(self) -> tuple[str, ...]:
    return parse_saved(self.modules_to_save)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which params of a task model train and how the adapter changes the frozen rest."""

  settings: Settings
  base_names: frozenset[str]  # flattened names of the params the base provides
  # The run's tokenizer (`encode_batch`), for `prompt_init_text`; without one (rebuilding a
  # saved run, whose trained prompt replaces the init) the prompt starts from sampled tokens.
  tokenizer: Any = dataclasses.field(default=None, compare=False)

  @property
  def method(self) -> Method:
    return METHODS[self.settings.method]

  def sites(self, params: Any) -> list[Site]:
    return sites(flatten(params), self.settings.targets)

  @property
  def frozen_names(self) -> frozenset[str]:
    """The base's params less those of `modules_to_save`."""
    scopes = tuple(f"{scope}/" for scope in self.settings.saved_scopes)
    return frozenset(n for n in self.base_names if not n.startswith(scopes))

  def frozen(self, params: Any) -> Any:
    """The frozen part of a full param tree (boxed or not)."""
    names = self.frozen_names
    return unflatten({k: v for k, v in flatten(params).items() if k in names})

  def trainable(self, params: Any, rng: jax.Array) -> dict[str, Any]:
    """{'adapter': fresh adapter params, 'head': `params` that do not stay frozen (boxed or
    not)}."""
    flat, names = flatten(params), self.frozen_names
    head = {k: v for k, v in flat.items() if k not in names}
    if not self.method.folds:
      return {"adapter": self.method.module.init(flat, rng, self.settings, self._text_ids()),
              "head": unflatten(head)}
    adapter = {}
    for index, site in enumerate(sites(flat, self.settings.targets)):
      adapter[site.adapter] = self.method.module.init(
          site, flat[site.kernel], jax.random.fold_in(rng, index), self.settings)
    return {"adapter": unflatten(adapter), "head": unflatten(head)}

  @property
  def penalty(self) -> Callable[[Any], jax.Array] | None:
    """The method's term of the training loss (per weighted target), a function of the
    trainable tree: AdaLoRA's orthogonality regulariser; None for the others."""
    if self.settings.method != "adalora" or self.settings.orth_reg_weight == 0:
      return None
    return lambda trainable: adalora.penalty(trainable["adapter"], self.settings)

  def optimizer(self, tx: optax.GradientTransformationExtraArgs, total_steps: int
                ) -> optax.GradientTransformationExtraArgs:
    """The run's optimiser `tx` with the method's own state and updates: AdaLoRA's rank
    allocator (on the schedule of `total_steps`); `tx` for the others."""
    if self.settings.method != "adalora":
      return tx
    return adalora.allocator(tx, self.settings, total_steps)

  def _text_ids(self) -> tuple[int, ...]:
    text = self.settings.prompt_init_text
    if not text or self.tokenizer is None:
      return ()
    return tuple(self.tokenizer.encode_batch([text])[0])

  def combine(self, trainable: Mapping[str, Any], frozen: Any) -> Any:
    """The task model's params as training and evaluation run them: the frozen base and the
    head, with the adapter's hooks under `encoder/peft` or (`merge`) folded into the base."""
    if self.method.folds and not lora.on_activations(self.settings):
      return self.merge(trainable, frozen)
    flat = {**flatten(frozen), **flatten(trainable["head"])}
    hooks = self.method.module.hooks(trainable["adapter"], self.settings, EncoderDims.of(flat))
    flat.update(flatten(hooks, prefix=f"encoder/{PEFT}/"))
    return unflatten(flat)

  def merge(self, trainable: Mapping[str, Any], frozen: Any) -> Any:
    """The merged model of a weight method (`Method.folds`): base and adapter as one set of
    weights, plus the head (what `--to_hf` exports)."""
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
