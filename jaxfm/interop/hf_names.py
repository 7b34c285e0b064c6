"""How Hugging Face BERT / ELECTRA name what jaxfm's parameter tree holds.

One `Rule` per jaxfm parameter says which HF tensors it is made of and how to convert each way;
a `Dialect` says where one HF model family keeps each part of the network. `jaxfm.interop.hf`
reads and writes checkpoints with them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxfm.models import BertConfig

# HF config.json key -> BertConfig field.
_CONFIG_FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "hidden_act": "hidden_act",
    "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "initializer_range": "initializer_range",
    "embedding_size": "embedding_size",
}
# A pruned model's heads (`BertConfig.pruned_heads`, {"layer": [heads]}): transformers 4's key,
# whose tensors lack them, and jaxfm's, whose tensors hold them as zero heads (`_padded_attention`).
PRUNED_HEADS, PADDED_PRUNED_HEADS = "pruned_heads", "jaxfm_pruned_heads"
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size")
# HF activation name -> jaxfm's.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}
# Top-level modules of the encoder; inside task models they carry the model prefix.


class InteropError(ValueError):
  """A checkpoint cannot be converted: unsupported, inconsistent or unreadable."""


@dataclasses.dataclass(frozen=True)
class Dialect:
  """Where one HF model family keeps each part of the network."""

  model_type: str
  prefix: str  # of the encoder's tensors inside task models
  architectures: tuple[str, str]  # (bare encoder, masked LM)
  mlm_transform: str
  mlm_norm: str
  mlm_bias: str
  tied: tuple[tuple[str, str], ...]  # (tied copy, the tensor it duplicates)
  unsupported: tuple[tuple[str, str], ...]  # (name prefix, why it is ignored)
  has_pooler: bool

  @property
  def mlm_modules(self) -> tuple[str, ...]:
    return (self.mlm_transform, self.mlm_norm, self.mlm_bias)


BERT = Dialect(
    model_type="bert", prefix="bert.", architectures=("BertModel", "BertForMaskedLM"),
    mlm_transform="cls.predictions.transform.dense",
    mlm_norm="cls.predictions.transform.LayerNorm", mlm_bias="cls.predictions.bias",
    tied=(("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
          ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    unsupported=(("cls.seq_relationship.", "next-sentence-prediction head (not supported)"),),
    has_pooler=True)
ELECTRA = Dialect(
    model_type="electra", prefix="electra.", architectures=("ElectraModel", "ElectraForMaskedLM"),
    mlm_transform="generator_predictions.dense", mlm_norm="generator_predictions.LayerNorm",
    mlm_bias="generator_lm_head.bias",
    tied=(("generator_lm_head.weight", "embeddings.word_embeddings.weight"),),
    unsupported=(("discriminator_predictions.",
                  "ELECTRA replaced-token-detection head (not supported)"),),
    has_pooler=False)
_DIALECTS = {d.model_type: d for d in (BERT, ELECTRA)}


@dataclasses.dataclass(frozen=True)
class Rule:
  """One jaxfm parameter and the HF tensors (names without the model prefix) it is made of.

  `to_hf` uses array methods only, so it also runs on tracers to derive HF shapes.
  """

  path: str
  sources: tuple[str, ...]
  to_jax: Callable[..., np.ndarray]
  to_hf: Callable[[Any], tuple[Any, ...]]


def _copy(path: str, name: str) -> Rule:
  return Rule(path, (name,), lambda x: x, lambda x: (x,))


def linear(path: str, name: str) -> list[Rule]:
  # torch Linear weights are [out, in], Flax kernels [in, out].
  return [Rule(f"{path}/kernel", (f"{name}.weight",), lambda w: w.T, lambda k: (k.T,)),
          _copy(f"{path}/bias", f"{name}.bias")]


def _layer_norm(path: str, name: str) -> list[Rule]:
  return [_copy(f"{path}/scale", f"{name}.weight"), _copy(f"{path}/bias", f"{name}.bias")]


def _attention(path: str, name: str, config: BertConfig, layer: int,
               padded: bool) -> list[Rule]:
  """The attention's rules; a pruned layer's heads (`config.pruned_heads`) are absent from the
  HF tensors, or with `padded` there as zero heads (`pad_pruned_heads`)."""
  if padded and config.pruned_heads:
    return _padded_attention(path, name, config, layer)
  hidden, heads, head_dim = config.hidden_size, config.layer_heads(layer), config.head_dim
  qkv = tuple(f"{name}.self.{p}" for p in ("query", "key", "value"))
  return [
      # 3 x [heads * head_dim, hidden] <-> [hidden, 3, heads, head_dim]
      Rule(f"{path}/qkv_kernel", tuple(f"{n}.weight" for n in qkv),
            lambda *ws: np.stack([w.T.reshape(hidden, heads, head_dim) for w in ws], axis=1),
            lambda k: tuple(k[:, i].reshape(hidden, heads * head_dim).T for i in range(3))),
      # 3 x [heads * head_dim] <-> [3, heads, head_dim]
      Rule(f"{path}/qkv_bias", tuple(f"{n}.bias" for n in qkv),
            lambda *bs: np.stack([b.reshape(heads, head_dim) for b in bs]),
            lambda b: tuple(b[i].reshape(heads * head_dim) for i in range(3))),
      # [hidden, heads * head_dim] <-> [heads, head_dim, hidden]
      Rule(f"{path}/out_kernel", (f"{name}.output.dense.weight",),
            lambda w: w.T.reshape(heads, head_dim, hidden),
            lambda k: (k.reshape(heads * head_dim, hidden).T,)),
      _copy(f"{path}/out_bias", f"{name}.output.dense.bias"),
  ]


def _padded_attention(path: str, name: str, config: BertConfig, layer: int) -> list[Rule]:
  """The attention rules of a pruned layer written with all `num_heads` heads, the pruned ones
  zero: transformers 5 has no head pruning (`prune_heads`), and a zero head adds nothing to
  the attention output, so the HF model computes the pruned model's function. Read back, the
  zero heads are dropped again (and must be zero)."""
  hidden, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
  kept = np.asarray(config.kept_heads(layer))
  # Original head h <- kept position slot[h] (0 for a pruned head), times live[h] (0 or 1).
  slot = np.zeros(heads, np.int64)
  slot[kept] = np.arange(len(kept))
  live = np.zeros(heads, np.float32)
  live[kept] = 1.0
  qkv = tuple(f"{name}.self.{p}" for p in ("query", "key", "value"))

  def drop(full: np.ndarray, axis: int, source: str) -> np.ndarray:
    if np.any(np.delete(full, kept, axis=axis)):
      raise InteropError(f"{source}: heads {sorted(set(range(heads)) - set(kept.tolist()))} "
                         f"of layer {layer} are listed in {PADDED_PRUNED_HEADS} but not zero")
    return np.take(full, kept, axis=axis)

  def pad(x: Any, axis: int) -> Any:  # [..., kept, ...] -> [..., heads, ...] (runs on tracers)
    index = (slice(None),) * axis + (slot,)
    return x[index] * live.reshape((heads,) + (1,) * (x.ndim - axis - 1))

  return [
      # 3 x [heads * head_dim, hidden] <-> [hidden, 3, kept, head_dim]
      Rule(f"{path}/qkv_kernel", tuple(f"{n}.weight" for n in qkv),
            lambda *ws: np.stack([drop(w.T.reshape(hidden, heads, head_dim), 1, f"{n}.weight")
                                  for w, n in zip(ws, qkv)], axis=1),
            lambda k: tuple(pad(k[:, i], 1).reshape(hidden, heads * head_dim).T
                            for i in range(3))),
      # 3 x [heads * head_dim] <-> [3, kept, head_dim]
      Rule(f"{path}/qkv_bias", tuple(f"{n}.bias" for n in qkv),
            lambda *bs: np.stack([drop(b.reshape(heads, head_dim), 0, f"{n}.bias")
                                  for b, n in zip(bs, qkv)]),
            lambda b: tuple(pad(b[i], 0).reshape(heads * head_dim) for i in range(3))),
      # [hidden, heads * head_dim] <-> [kept, head_dim, hidden]
      Rule(f"{path}/out_kernel", (f"{name}.output.dense.weight",),
            lambda w: drop(w.T.reshape(heads, head_dim, hidden), 0,
                           f"{name}.output.dense.weight"),
            lambda k: (pad(k, 0).reshape(heads * head_dim, hidden).T,)),
      _copy(f"{path}/out_bias", f"{name}.output.dense.bias"),
  ]


def param_rules(config: BertConfig, dialect: Dialect, *, pooler: bool, mlm: bool,
                padded: bool = True) -> list[Rule]:
  """Every parameter of the unscanned jaxfm tree with its HF source tensors; `padded`: a
  pruned model's HF tensors hold its pruned heads as zeros (see `_padded_attention`)."""
  rules = [
      _copy("encoder/embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight"),
      _copy("encoder/embeddings/position_embeddings/embedding",
            "embeddings.position_embeddings.weight"),
      _copy("encoder/embeddings/token_type_embeddings/embedding",
            "embeddings.token_type_embeddings.weight"),
      *_layer_norm("encoder/embeddings/layer_norm", "embeddings.LayerNorm"),
  ]
  if config.embedding_dim != config.hidden_size:
    rules += linear("encoder/embeddings/projection", "embeddings_project")
  for i in range(config.num_layers):
    path, name = f"encoder/layer_{i}", f"encoder.layer.{i}"
    rules += [*_attention(f"{path}/attention", f"{name}.attention", config, i, padded),
              *_layer_norm(f"{path}/attention_norm", f"{name}.attention.output.LayerNorm"),
              *linear(f"{path}/intermediate", f"{name}.intermediate.dense"),
              *linear(f"{path}/output", f"{name}.output.dense"),
              *_layer_norm(f"{path}/output_norm", f"{name}.output.LayerNorm")]
  if pooler:
    rules += linear("encoder/pooler", "pooler.dense")
  if mlm:
    rules += [*linear("mlm_head/transform", dialect.mlm_transform),
              *_layer_norm("mlm_head/transform_norm", dialect.mlm_norm),
              _copy("mlm_head/bias", dialect.mlm_bias)]
  return rules


@dataclasses.dataclass(frozen=True)
class TaskHead:
  """A fine-tuning head: its jaxfm params and the HF task model that has the same one."""

  path: str  # jaxfm: {path}/kernel [hidden, outputs], {path}/bias [outputs]
  module: str  # HF Linear of the task model
  architecture: str
  pooler: bool  # whether the task model reads the pooled [CLS] vector


SEQUENCE_HEAD = TaskHead("classifier", "classifier", "BertForSequenceClassification", True)
TOKEN_HEAD = TaskHead("classifier", "classifier", "BertForTokenClassification", False)
SPAN_HEAD = TaskHead("span", "qa_outputs", "BertForQuestionAnswering", False)


def task_head(flat: Mapping[str, np.ndarray], pooler: bool) -> TaskHead | None:
  """The fine-tuning head among `flat`'s params (the pooler tells sequence from token heads)."""
  if "span/kernel" in flat:
    return SPAN_HEAD
  if "classifier/kernel" in flat:
    return SEQUENCE_HEAD if pooler else TOKEN_HEAD
  return None


def labels_to_hf(outputs: int, label_names: Sequence[str] | None) -> dict[str, Any]:
  """HF's id2label / label2id for a head with `outputs` labels (LABEL_i when unnamed)."""
  names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(outputs)]
  if len(names) != outputs:
    raise InteropError(f"{len(names)} label names for a head with {outputs} outputs")
  return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def labels_from_hf(hf_config: Mapping[str, Any], outputs: int, source: str) -> list[str]:
  """The label names of config.json's `id2label` in id order, one per head output."""
  id2label = hf_config.get("id2label") or {}
  try:
    by_id = {int(i): str(name) for i, name in id2label.items()}
  except (AttributeError, TypeError, ValueError):
    raise InteropError(f"{source}: id2label must map label ids to names, not "
                       f"{id2label!r}") from None
  if sorted(by_id) != list(range(outputs)):
    raise InteropError(f"{source}: id2label names {len(by_id)} labels (ids {sorted(by_id)}), "
                       f"but the classifier has {outputs} outputs (ids 0 ... {outputs - 1})")
  return [by_id[i] for i in range(outputs)]


def dialect_of(hf_config: Mapping[str, Any], source: str) -> Dialect:
  model_type = hf_config.get("model_type")
  if model_type not in _DIALECTS:
    raise InteropError(f"{source}: model_type {model_type!r} is not supported "
                       f"(BERT-like types: {', '.join(_DIALECTS)})")
  dialect = _DIALECTS[model_type]
  family = dialect.architectures[0].removesuffix("Model")
  foreign = [a for a in hf_config.get("architectures") or () if not a.startswith(family)]
  if foreign:
    raise InteropError(f"{source}: architectures {foreign} are not {family} models")
  return dialect


def config_from_hf(hf_config: Mapping[str, Any], dialect: Dialect, source: str) -> BertConfig:
  required = _SHAPE_KEYS + (("embedding_size",) if dialect is ELECTRA else ())
  absent = [k for k in required if k not in hf_config]
  if absent:
    raise InteropError(f"{source}: missing {', '.join(absent)}")
  if hf_config.get("position_embedding_type", "absolute") != "absolute":
    raise InteropError(f"{source}: position_embedding_type "
                       f"{hf_config['position_embedding_type']!r} is not supported (only absolute)")
  if hf_config.get("is_decoder") or hf_config.get("add_cross_attention"):
    raise InteropError(f"{source}: decoder / cross-attention models are not supported")
  act = hf_config.get("hidden_act", "gelu")
  if act not in _ACTIVATIONS:
    raise InteropError(f"{source}: hidden_act {act!r} is not supported ({', '.join(_ACTIVATIONS)})")
  fields = {field: hf_config[key] for key, field in _CONFIG_FIELDS.items() if key in hf_config}
  fields["hidden_act"] = _ACTIVATIONS[act]
  fields["pruned_heads"] = _pruned_heads(hf_config, fields["num_layers"], source)
  if dialect is BERT:
    fields.pop("embedding_size", None)  # not a BERT field: HF itself ignores it
  if fields["hidden_size"] % fields["num_heads"]:
    raise InteropError(f"{source}: hidden_size {fields['hidden_size']} is not a multiple of "
                       f"num_attention_heads {fields['num_heads']}")
  try:
    return BertConfig(**fields)
  except ValueError as e:
    raise InteropError(f"{source}: {e}") from None


def heads_padded(hf_config: Mapping[str, Any]) -> bool:
  """Whether a pruned model's tensors hold its pruned heads as zeros (jaxfm's export)."""
  return bool(hf_config.get(PADDED_PRUNED_HEADS))


def _pruned_heads(hf_config: Mapping[str, Any], layers: int,
                  source: str) -> tuple[tuple[int, ...], ...]:
  """{"layer": [heads]} under either key as one tuple per layer."""
  found = [k for k in (PRUNED_HEADS, PADDED_PRUNED_HEADS) if hf_config.get(k)]
  if len(found) > 1:
    raise InteropError(f"{source}: both {PRUNED_HEADS} and {PADDED_PRUNED_HEADS} are set")
  if not found:
    return ()
  per_layer = [[] for _ in range(layers)]
  try:
    for layer, heads in hf_config[found[0]].items():
      per_layer[int(layer)] = [int(h) for h in heads]
  except (AttributeError, IndexError, TypeError, ValueError):
    raise InteropError(f"{source}: {found[0]} must map layer indices below {layers} to lists "
                       f"of head indices, not {hf_config[found[0]]!r}") from None
  return tuple(map(tuple, per_layer))


def config_to_hf(config: BertConfig, dialect: Dialect, architecture: str) -> dict[str, Any]:
  hf_config = {"architectures": [architecture], "model_type": dialect.model_type,
               "position_embedding_type": "absolute", "tie_word_embeddings": True}
  hf_config.update({key: getattr(config, field) for key, field in _CONFIG_FIELDS.items()})
  hf_config["hidden_act"] = {v: k for k, v in _ACTIVATIONS.items()}[config.hidden_act]
  if config.pruned_heads:
    hf_config[PADDED_PRUNED_HEADS] = {str(i): list(heads)
                                      for i, heads in enumerate(config.pruned_heads) if heads}
  if dialect is ELECTRA:
    hf_config["embedding_size"] = config.embedding_dim
  else:
    del hf_config["embedding_size"]
  return hf_config


def check_head_activation(config: BertConfig, dialect: Dialect, mlm: bool) -> None:
  if mlm and dialect is ELECTRA and config.hidden_act != "gelu":
    raise InteropError(f"HF's ELECTRA MLM head always uses gelu, but hidden_act is "
                       f"{config.hidden_act!r}")
