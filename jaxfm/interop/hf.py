"""Hugging Face BERT / ELECTRA checkpoints <-> jaxfm parameter trees, with strict accounting.

Import accounts for every source tensor (used, or ignored for a stated reason)
and fills every target parameter (from the checkpoint, or freshly initialised
by name only when asked to). Export writes a `config.json` and
`model.safetensors` that transformers loads with no missing or unexpected keys.
Factorised embeddings (`embedding_size != hidden_size`) exist in HF only as
ELECTRA, so such models are read and written in ELECTRA naming.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxfm.interop import torch_pickle
from jaxfm.interop.checkpoint_dir import (Params, atomic_directory, copy_tokenizer_files,
                                          numpy_params, read_safetensors, tokenizer_files)
from jaxfm.trees import flatten, unflatten
from jaxfm.models import BertConfig, BertEncoder, BertForMaskedLM, BertModel, stack_layers
from jaxfm.models.heads import MlmHead
from jaxfm.sharding import unbox

TASKS = ("auto", "mlm", "base")
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

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
_SHAPE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
               "intermediate_size")
# HF activation name -> jaxfm's.
_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh",
                "relu": "relu"}
# Top-level modules of the encoder; inside task models they carry the model prefix.
_ENCODER_MODULES = ("embeddings.", "embeddings_project.", "encoder.", "pooler.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_MAX_NAMES = 12


class InteropError(ValueError):
  """A checkpoint cannot be converted: unsupported, inconsistent or unreadable."""


@dataclasses.dataclass(frozen=True)
class _Dialect:
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


_BERT = _Dialect(
    model_type="bert", prefix="bert.", architectures=("BertModel", "BertForMaskedLM"),
    mlm_transform="cls.predictions.transform.dense",
    mlm_norm="cls.predictions.transform.LayerNorm", mlm_bias="cls.predictions.bias",
    tied=(("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
          ("cls.predictions.decoder.bias", "cls.predictions.bias")),
    unsupported=(("cls.seq_relationship.", "next-sentence-prediction head (not supported)"),),
    has_pooler=True)
_ELECTRA = _Dialect(
    model_type="electra", prefix="electra.", architectures=("ElectraModel", "ElectraForMaskedLM"),
    mlm_transform="generator_predictions.dense", mlm_norm="generator_predictions.LayerNorm",
    mlm_bias="generator_lm_head.bias",
    tied=(("generator_lm_head.weight", "embeddings.word_embeddings.weight"),),
    unsupported=(("discriminator_predictions.",
                  "ELECTRA replaced-token-detection head (not supported)"),),
    has_pooler=False)
_DIALECTS = {d.model_type: d for d in (_BERT, _ELECTRA)}


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One jaxfm parameter and the HF tensors (names without the model prefix) it is made of.

  `to_hf` uses array methods only, so it also runs on tracers to derive HF shapes.
  """

  path: str
  sources: tuple[str, ...]
  to_jax: Callable[..., np.ndarray]
  to_hf: Callable[[Any], tuple[Any, ...]]


def _copy(path: str, name: str) -> _Rule:
  return _Rule(path, (name,), lambda x: x, lambda x: (x,))


def _linear(path: str, name: str) -> list[_Rule]:
  # torch Linear weights are [out, in], Flax kernels [in, out].
  return [_Rule(f"{path}/kernel", (f"{name}.weight",), lambda w: w.T, lambda k: (k.T,)),
          _copy(f"{path}/bias", f"{name}.bias")]


def _layer_norm(path: str, name: str) -> list[_Rule]:
  return [_copy(f"{path}/scale", f"{name}.weight"), _copy(f"{path}/bias", f"{name}.bias")]


def _attention(path: str, name: str, config: BertConfig) -> list[_Rule]:
  hidden, heads, head_dim = config.hidden_size, config.num_heads, config.head_dim
  qkv = tuple(f"{name}.self.{p}" for p in ("query", "key", "value"))
  return [
      # 3 x [heads * head_dim, hidden] <-> [hidden, 3, heads, head_dim]
      _Rule(f"{path}/qkv_kernel", tuple(f"{n}.weight" for n in qkv),
            lambda *ws: np.stack([w.T.reshape(hidden, heads, head_dim) for w in ws], axis=1),
            lambda k: tuple(k[:, i].reshape(hidden, heads * head_dim).T for i in range(3))),
      # 3 x [heads * head_dim] <-> [3, heads, head_dim]
      _Rule(f"{path}/qkv_bias", tuple(f"{n}.bias" for n in qkv),
            lambda *bs: np.stack([b.reshape(heads, head_dim) for b in bs]),
            lambda b: tuple(b[i].reshape(heads * head_dim) for i in range(3))),
      # [hidden, heads * head_dim] <-> [heads, head_dim, hidden]
      _Rule(f"{path}/out_kernel", (f"{name}.output.dense.weight",),
            lambda w: w.T.reshape(heads, head_dim, hidden),
            lambda k: (k.reshape(heads * head_dim, hidden).T,)),
      _copy(f"{path}/out_bias", f"{name}.output.dense.bias"),
  ]


def _rules(config: BertConfig, dialect: _Dialect, *, pooler: bool, mlm: bool) -> list[_Rule]:
  """Every parameter of the unscanned jaxfm tree with its HF source tensors."""
  rules = [
      _copy("encoder/embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight"),
      _copy("encoder/embeddings/position_embeddings/embedding",
            "embeddings.position_embeddings.weight"),
      _copy("encoder/embeddings/token_type_embeddings/embedding",
            "embeddings.token_type_embeddings.weight"),
      *_layer_norm("encoder/embeddings/layer_norm", "embeddings.LayerNorm"),
  ]
  if config.embedding_dim != config.hidden_size:
    rules += _linear("encoder/embeddings/projection", "embeddings_project")
  for i in range(config.num_layers):
    path, name = f"encoder/layer_{i}", f"encoder.layer.{i}"
    rules += [*_attention(f"{path}/attention", f"{name}.attention", config),
              *_layer_norm(f"{path}/attention_norm", f"{name}.attention.output.LayerNorm"),
              *_linear(f"{path}/intermediate", f"{name}.intermediate.dense"),
              *_linear(f"{path}/output", f"{name}.output.dense"),
              *_layer_norm(f"{path}/output_norm", f"{name}.output.LayerNorm")]
  if pooler:
    rules += _linear("encoder/pooler", "pooler.dense")
  if mlm:
    rules += [*_linear("mlm_head/transform", dialect.mlm_transform),
              *_layer_norm("mlm_head/transform_norm", dialect.mlm_norm),
              _copy("mlm_head/bias", dialect.mlm_bias)]
  return rules


@dataclasses.dataclass(frozen=True)
class _TaskHead:
  """A fine-tuning head: its jaxfm params and the HF task model that has the same one."""

  path: str  # jaxfm: {path}/kernel [hidden, outputs], {path}/bias [outputs]
  module: str  # HF Linear of the task model
  architecture: str


def _task_head(flat: Mapping[str, np.ndarray], pooler: bool) -> _TaskHead | None:
  """The fine-tuning head among `flat`'s params (the pooler tells sequence from token heads)."""
  if "span/kernel" in flat:
    return _TaskHead("span", "qa_outputs", "BertForQuestionAnswering")
  if "classifier/kernel" in flat:
    return _TaskHead("classifier", "classifier", "BertForSequenceClassification" if pooler
                     else "BertForTokenClassification")
  return None


def _labels_to_hf(outputs: int, label_names: Sequence[str] | None) -> dict[str, Any]:
  """HF's id2label / label2id for a head with `outputs` labels (LABEL_i when unnamed)."""
  names = list(label_names) if label_names else [f"LABEL_{i}" for i in range(outputs)]
  if len(names) != outputs:
    raise InteropError(f"{len(names)} label names for a head with {outputs} outputs")
  return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def _model(config: BertConfig, mlm: bool) -> nn.Module:
  return (BertForMaskedLM if mlm else BertModel)(config.replace(scan_layers=False))


def _dummy_inputs() -> tuple[jax.Array, jax.Array, jax.Array]:
  ids = jnp.zeros((1, 1), jnp.int32)  # [batch, length]
  return ids, ids, jnp.ones_like(ids)


@functools.lru_cache(maxsize=8)
def _param_shapes(config: BertConfig, mlm: bool) -> dict[str, tuple[int, ...]]:
  abstract = jax.eval_shape(_model(config, mlm).init, jax.random.key(0), *_dummy_inputs())
  return {k: tuple(v.shape) for k, v in flatten(unbox(abstract["params"])).items()}


def _initial_head(config: BertConfig, mlm: bool) -> dict[str, np.ndarray]:
  """The head's own initialisation (MLM head, else pooler), named as in the whole model."""
  rng, hidden = jax.random.key(0), jnp.zeros((1, 1, config.hidden_size))  # [batch, length, hidden]
  if mlm:
    table = jnp.zeros((config.embedding_dim, config.vocab_size))  # stands in for the tied decoder
    variables, prefix = MlmHead(config).init(rng, hidden, lambda x: x @ table), "mlm_head/"
  else:
    variables, prefix = BertEncoder(config).init(rng, hidden, method=BertEncoder.pool), "encoder/"
  return {prefix + k: np.asarray(v, np.float32)
          for k, v in flatten(unbox(variables["params"])).items()}


def _hf_shapes(rule: _Rule, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  outs = jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(shape, jnp.float32))
  return [tuple(o.shape) for o in outs]


def _names(names: Sequence[str]) -> str:
  shown = ", ".join(names[:_MAX_NAMES])
  return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def _dialect(hf_config: Mapping[str, Any], source: str) -> _Dialect:
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


def _config_from_hf(hf_config: Mapping[str, Any], dialect: _Dialect, source: str) -> BertConfig:
  required = _SHAPE_KEYS + (("embedding_size",) if dialect is _ELECTRA else ())
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
  if dialect is _BERT:
    fields.pop("embedding_size", None)  # not a BERT field: HF itself ignores it
  if fields["hidden_size"] % fields["num_heads"]:
    raise InteropError(f"{source}: hidden_size {fields['hidden_size']} is not a multiple of "
                       f"num_attention_heads {fields['num_heads']}")
  return BertConfig(**fields)


def _config_to_hf(config: BertConfig, dialect: _Dialect, architecture: str) -> dict[str, Any]:
  hf_config = {"architectures": [architecture], "model_type": dialect.model_type,
               "position_embedding_type": "absolute", "tie_word_embeddings": True}
  hf_config.update({key: getattr(config, field) for key, field in _CONFIG_FIELDS.items()})
  hf_config["hidden_act"] = {v: k for k, v in _ACTIVATIONS.items()}[config.hidden_act]
  if dialect is _ELECTRA:
    hf_config["embedding_size"] = config.embedding_dim
  else:
    del hf_config["embedding_size"]
  return hf_config


def _check_head_activation(config: BertConfig, dialect: _Dialect, mlm: bool) -> None:
  if mlm and dialect is _ELECTRA and config.hidden_act != "gelu":
    raise InteropError(f"HF's ELECTRA MLM head always uses gelu, but hidden_act is "
                       f"{config.hidden_act!r}")


def _read_checkpoint(hf_dir: str) -> tuple[str, dict[str, np.ndarray]]:
  """(path, tensors) of model.safetensors, else of pytorch_model.bin."""
  path = os.path.join(hf_dir, SAFETENSORS_FILE)
  if os.path.isfile(path):
    return path, read_safetensors(path)
  path = os.path.join(hf_dir, TORCH_FILE)
  if os.path.isfile(path):
    try:
      return path, torch_pickle.load_state_dict(path)
    except Exception as e:  # untrusted input: any failure means "unreadable"
      raise InteropError(f"{path}: cannot read ({e})") from None
  raise InteropError(f"{hf_dir}: no {SAFETENSORS_FILE} or {TORCH_FILE}")


def _canonical(tensors: Mapping[str, np.ndarray], dialect: _Dialect,
               source: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Strips the model prefix and legacy LayerNorm gamma/beta names.

  Returns:
    Tensors by canonical name, and each canonical name's original name.
  """
  out, origin = {}, {}
  for name, value in tensors.items():
    key = name.removeprefix(dialect.prefix)
    for old, new in (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")):
      if key.endswith(old):
        key = key[:-len(old)] + new
    if key in origin:
      raise InteropError(f"{source}: {origin[key]} and {name} are the same tensor {key}")
    out[key], origin[key] = value, name
  for copy, original in dialect.tied:  # a lone tied copy stands in for its original
    if copy in out and original not in out:
      out[original], origin[original] = out.pop(copy), origin.pop(copy)
  return out, origin


def _ignore_reason(name: str, tensors: Mapping[str, np.ndarray], origin: Mapping[str, str],
                   dialect: _Dialect, mlm: bool, source: str) -> str | None:
  """Why an unused tensor may be left out, or None when leaving it out would lose weights."""
  if name in _BUFFERS:
    return "buffer, recomputed by the model"
  for copy, original in dialect.tied:
    if name == copy:
      if not np.array_equal(tensors[name], tensors[original]):
        raise InteropError(f"{source}: {origin[name]} differs from {origin[original]}; "
                           f"untied output embeddings are not supported")
      return f"tied copy of {origin[original]}"
  for prefix, reason in dialect.unsupported:
    if name.startswith(prefix):
      return reason
  if mlm and name.startswith("pooler."):
    return "pooler, not part of BertForMaskedLM (task 'mlm')"
  if not mlm and name.startswith(dialect.mlm_modules):
    return "MLM head, not part of BertModel (task 'base')"
  return None


@dataclasses.dataclass(frozen=True)
class ImportResult:
  """An imported model and the accounting of every tensor and parameter.

  Attributes:
    config: the architecture read from config.json.
    params: float32 numpy parameters, in the layout `config.scan_layers` asks for.
    task: "mlm" (`BertForMaskedLM` params) or "base" (`BertModel` params).
    source: the weights file read.
    used: source tensors that became parameters.
    ignored: source tensors left out, each with the reason.
    initialised: parameters absent from the source, freshly initialised.
  """

  config: BertConfig
  params: Params
  task: str
  source: str
  used: list[str]
  ignored: dict[str, str]
  initialised: list[str]

  def summary(self) -> str:
    model = "BertForMaskedLM" if self.task == "mlm" else "BertModel"
    lines = [f"imported {self.source} as jaxfm {model}: {len(self.used)} tensors used, "
             f"{len(self.ignored)} ignored, {len(self.initialised)} params initialised"]
    lines += [f"  ignored {name}: {reason}" for name, reason in self.ignored.items()]
    lines += [f"  initialised {path}" for path in self.initialised]
    return "\n".join(lines)


def import_hf(hf_dir: str, *, task: str = "mlm", init_missing_head: bool = False,
              scan_layers: bool = False) -> ImportResult:
  """Reads a Hugging Face BERT (or ELECTRA) model dir into jaxfm parameters.

  Args:
    hf_dir: folder with config.json and model.safetensors or pytorch_model.bin.
    task: "mlm" for `BertForMaskedLM` params, "base" for `BertModel` params,
      "auto" for "mlm" exactly when the checkpoint has an MLM head.
    init_missing_head: initialise the head (MLM head, or pooler for "base") with
      the model's own initialisers when the checkpoint lacks it, instead of failing.
    scan_layers: return the scanned (stacked) layer layout.

  Raises:
    InteropError: unsupported model, unreadable file, wrong shape, or tensors
      that are missing or would go unused.
  """
  if task not in TASKS:
    raise InteropError(f"task {task!r} is not one of {TASKS}")
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise InteropError(f"{config_path}: not valid JSON ({e})") from None
  dialect = _dialect(hf_config, config_path)
  config = _config_from_hf(hf_config, dialect, config_path)
  source, raw = _read_checkpoint(hf_dir)
  tensors, origin = _canonical(raw, dialect, source)
  if task == "auto":
    task = "mlm" if any(n.startswith(dialect.mlm_modules) for n in tensors) else "base"
  mlm = task == "mlm"
  _check_head_activation(config, dialect, mlm)
  rules = _rules(config, dialect, pooler=not mlm, mlm=mlm)
  shapes = _param_shapes(config, mlm)
  assert {r.path for r in rules} == set(shapes), "conversion rules out of sync with the model"

  flat, used, missing = {}, [], {}
  for rule in rules:
    absent = [s for s in rule.sources if s not in tensors]
    if absent:
      missing[rule.path] = absent
      continue
    for name, shape in zip(rule.sources, _hf_shapes(rule, shapes[rule.path])):
      if tensors[name].shape != shape:
        raise InteropError(f"{source}: tensor {origin[name]} has shape {tensors[name].shape}, "
                           f"but {CONFIG_FILE} implies {shape}")
    sources = [np.asarray(tensors[s], np.float32) for s in rule.sources]
    flat[rule.path] = np.asarray(rule.to_jax(*sources), np.float32)
    used += [origin[s] for s in rule.sources]

  used_names = set(used)
  ignored, unexpected = {}, []
  for name in tensors:
    if origin[name] in used_names:
      continue
    reason = _ignore_reason(name, tensors, origin, dialect, mlm, source)
    if reason is None:
      unexpected.append(origin[name])
    else:
      ignored[origin[name]] = reason

  head = "mlm_head/" if mlm else "encoder/pooler/"
  initialised = [p for p in missing if p.startswith(head)] if init_missing_head else []
  unfilled = [p for p in missing if p not in initialised]
  problems = []
  if unfilled:
    names = list(dict.fromkeys(s for p in unfilled for s in missing[p]))
    hint = (" (the checkpoint has no such head; pass init_missing_head to initialise it)"
            if all(p.startswith(head) for p in unfilled) else "")
    problems.append(f"missing tensor(s) {_names(names)}{hint}")
  if unexpected:
    problems.append(f"unexpected tensor(s) {_names(unexpected)}")
  if problems:
    raise InteropError(f"{source}: {'; '.join(problems)}")
  if initialised:
    fresh = _initial_head(config, mlm)
    flat.update({p: fresh[p] for p in initialised})

  params = unflatten(flat)
  if scan_layers:
    params = stack_layers(params)
  return ImportResult(config.replace(scan_layers=scan_layers), params, task, source, used,
                      ignored, initialised)


@dataclasses.dataclass(frozen=True)
class ExportResult:
  """What `export_hf` wrote: the HF architecture and each tensor's jaxfm origin."""

  out_dir: str
  architecture: str
  tensors: dict[str, str]
  tokenizer_files: list[str]

  def summary(self) -> str:
    tied = {k: v for k, v in self.tensors.items() if v.startswith("tied copy")}
    lines = [f"exported {self.architecture} to {self.out_dir}: {len(self.tensors)} tensors "
             f"({len(tied)} tied copies), tokenizer files: "
             f"{', '.join(self.tokenizer_files) or 'none'}"]
    lines += [f"  {name}: {origin}" for name, origin in tied.items()]
    return "\n".join(lines)


def _hf_name(name: str, dialect: _Dialect) -> str:
  return dialect.prefix + name if name.startswith(_ENCODER_MODULES) else name


def export_hf(params: Params, config: BertConfig, out_dir: str,
              tokenizer_dir: str | None = None,
              label_names: Sequence[str] | None = None) -> ExportResult:
  """Writes jaxfm params as a Hugging Face model dir (atomically; nothing is left on error).

  `params` may use either layer layout. With an MLM head the dir is a `BertForMaskedLM`
  (tied decoder written too); with a fine-tuning head a `BertForSequenceClassification`
  (classifier + pooler), `BertForTokenClassification` (classifier, no pooler) or
  `BertForQuestionAnswering` (span head), whose `id2label` takes `label_names` when given;
  otherwise a `BertModel`. Tokenizer files found in `tokenizer_dir` are copied alongside.
  """
  flat = numpy_params(params)
  config = config.replace(scan_layers=False)
  dialect = _ELECTRA if config.embedding_dim != config.hidden_size else _BERT
  mlm = any(p.startswith("mlm_head/") for p in flat)
  pooler = any(p.startswith("encoder/pooler/") for p in flat)
  head = _task_head(flat, pooler)
  if head and (mlm or dialect is not _BERT):
    raise InteropError(f"a {head.path!r} head can be written only as a BERT task model "
                       f"({head.architecture}), not beside an MLM head or in "
                       f"{dialect.model_type} naming (factorised embeddings)")
  if pooler and (mlm or not dialect.has_pooler):
    raise InteropError(f"params with a pooler cannot be written as "
                       f"{dialect.architectures[mlm]}, which has none")
  _check_head_activation(config, dialect, mlm)
  rules = _rules(config, dialect, pooler=pooler, mlm=mlm)
  expected = {**_param_shapes(config, False), **_param_shapes(config, True)}
  if head:
    rules += _linear(head.path, head.module)
    outputs = flat[f"{head.path}/kernel"].shape[-1]
    if head.path == "span" and outputs != 2:
      raise InteropError(f"span/kernel has {outputs} outputs; a span head has 2 (start, end)")
    expected.update({f"{head.path}/kernel": (config.hidden_size, outputs),
                     f"{head.path}/bias": (outputs,)})
  unknown = sorted(set(flat) - {r.path for r in rules})
  if unknown:
    raise InteropError(f"params without a Hugging Face equivalent: {_names(unknown)}")
  absent = [r.path for r in rules if r.path not in flat]
  if absent:
    raise InteropError(f"params are missing {_names(absent)}")
  wrong = [f"{p} {flat[p].shape} (config needs {expected[p]})"
           for p in flat if flat[p].shape != expected[p]]
  if wrong:
    raise InteropError(f"params do not match the config: {_names(wrong)}")

  tensors, origins = {}, {}
  for rule in rules:
    for name, value in zip(rule.sources, rule.to_hf(flat[rule.path])):
      tensors[_hf_name(name, dialect)] = np.ascontiguousarray(value)
      origins[_hf_name(name, dialect)] = rule.path
  if mlm:
    for copy, original in dialect.tied:
      tensors[copy] = tensors[_hf_name(original, dialect)]
      origins[copy] = f"tied copy of {_hf_name(original, dialect)}"
  architecture = head.architecture if head else dialect.architectures[mlm]
  hf_config = _config_to_hf(config, dialect, architecture)
  if head and head.path == "classifier":
    hf_config.update(_labels_to_hf(outputs, label_names))
  with atomic_directory(out_dir) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE),
                                metadata={"format": "pt"})
    copied = copy_tokenizer_files(tokenizer_files(tokenizer_dir), tmp)
  return ExportResult(os.path.abspath(out_dir), architecture, origins, copied)
