"""Architecture hyperparameters of the BERT family and named size presets."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ("gelu", "gelu_new", "gelu_tanh", "relu")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shape and numerics of a BERT-style encoder.

  `embedding_size` smaller than `hidden_size` gives ELECTRA-style factorised
  embeddings (a projection after the embedding LayerNorm).

  `pruned_heads` describes a structurally pruned model (`jaxfm.compress.pruning`), as HF's
  config field of that name: per layer, the original indices of the attention heads it no
  longer has; the others keep their size `head_dim` and their order. () = none pruned.
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  embedding_size: int | None = None
  hidden_act: str = "gelu"
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  dtype: str = "float32"  # compute dtype; parameters are always float32
  remat_policy: str = "none"
  scan_layers: bool = False
  # XLA:CPU forms of the matmuls, dropout and remat'd backward order (`jaxfm.cpu`): the same
  # values, scheduled for CPU. Set by the run from its devices, not saved with the model.
  cpu_paths: bool = False
  # The MLM loss runs the tied decoder over this many vocabulary rows at a time and never
  # holds the whole logits (`jaxfm.train.cross_entropy`); 0 = the whole vocabulary at once.
  loss_vocab_chunk: int = 4096
  pruned_heads: tuple[tuple[int, ...], ...] = ()

  def __post_init__(self):
    # A saved config holds lists; the config is hashed (jit, caches), so tuples of sorted ints.
    pruned = tuple(tuple(sorted(int(h) for h in layer)) for layer in self.pruned_heads or ())
    object.__setattr__(self, "pruned_heads", pruned if any(pruned) else ())
    if not self.pruned_heads:
      return
    if len(pruned) != self.num_layers:
      raise ValueError(f"model.pruned_heads has {len(pruned)} layers, the model "
                       f"{self.num_layers}")
    for layer, heads in enumerate(pruned):
      if len(set(heads)) != len(heads) or not all(0 <= h < self.num_heads for h in heads):
        raise ValueError(f"model.pruned_heads[{layer}]={list(heads)}: each must be a distinct "
                         f"head index in [0, {self.num_heads})")
      if len(heads) == self.num_heads:
        raise ValueError(f"model.pruned_heads[{layer}] removes every head of layer {layer}")
    if self.scan_layers and len(set(map(len, pruned))) > 1:
      raise ValueError(f"model.scan_layers=True needs the same number of heads in every layer; "
                       f"model.pruned_heads leaves {[self.layer_heads(i) for i in range(len(pruned))]}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def kept_heads(self, layer: int) -> tuple[int, ...]:
    """The original indices of layer `layer`'s attention heads, ascending."""
    pruned = set(self.pruned_heads[layer]) if self.pruned_heads else set()
    return tuple(h for h in range(self.num_heads) if h not in pruned)

  def layer_heads(self, layer: int) -> int:
    """How many attention heads layer `layer` has."""
    return self.num_heads - (len(self.pruned_heads[layer]) if self.pruned_heads else 0)

  @property
  def embedding_dim(self) -> int:
    return self.embedding_size or self.hidden_size

  def replace(self, **changes: Any) -> "BertConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any]) -> "BertConfig":
    """Builds a config from a mapping (e.g. a ConfigDict), rejecting unknown keys."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config field(s): {', '.join(unknown)}")
    return cls(**dict(values))


# Sizes from Turc et al. 2019 ("Well-Read Students Learn Better") and the original BERT paper.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
    "mini": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
    "small": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
    "medium": dict(num_layers=8, hidden_size=512, num_heads=8, intermediate_size=2048),
    "base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    "large": dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
    # ELECTRA-small discriminator: factorised 128-wide embeddings.
    "electra_small": dict(num_layers=12, hidden_size=256, num_heads=4, intermediate_size=1024,
                          embedding_size=128),
}


def preset(name: str, **overrides: Any) -> BertConfig:
  """Returns the named size preset with `overrides` applied."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
  return BertConfig(**{**PRESETS[name], **overrides})
