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
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxfm.interop import torch_pickle
from jaxfm.interop.hf_names import (BERT, ELECTRA, SEQUENCE_HEAD, SPAN_HEAD, TOKEN_HEAD, Dialect,
                                    InteropError, Rule, TaskHead, check_head_activation,
                                    config_from_hf, config_to_hf, dialect_of, heads_padded,
                                    labels_from_hf, labels_to_hf, linear, param_rules, task_head)
from jaxfm.interop.checkpoint_dir import (Params, atomic_directory, copy_tokenizer_files,
                                          numpy_params, read_safetensors, tokenizer_files)
from jaxfm.trees import flatten, unflatten
from jaxfm.models import BertConfig, BertEncoder, BertForMaskedLM, BertModel, stack_layers
from jaxfm.models.heads import MlmHead
from jaxfm.sharding import unbox

TASKS = ("auto", "mlm", "base")
# `import_hf_task`'s tasks: the HF task model each reads, by jaxfm task kind.
TASK_HEADS = {"classification": SEQUENCE_HEAD, "ner": TOKEN_HEAD, "qa": SPAN_HEAD}
CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"

_ENCODER_MODULES = ("embeddings.", "embeddings_project.", "encoder.", "pooler.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_MAX_NAMES = 12


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


def _hf_shapes(rule: Rule, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  outs = jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(shape, jnp.float32))
  return [tuple(o.shape) for o in outs]


def _names(names: Sequence[str]) -> str:
  shown = ", ".join(names[:_MAX_NAMES])
  return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


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


def _canonical(tensors: Mapping[str, np.ndarray], dialect: Dialect,
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


@dataclasses.dataclass(frozen=True)
class _Target:
  """The jaxfm model an import fills: which of the optional modules it has."""

  model: str
  task: str
  pooler: bool
  mlm: bool

  def __str__(self) -> str:
    return f"{self.model} (task {self.task!r})"


def _ignore_reason(name: str, tensors: Mapping[str, np.ndarray], origin: Mapping[str, str],
                   dialect: Dialect, target: _Target, source: str) -> str | None:
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
  if not target.pooler and name.startswith("pooler."):
    return f"pooler, not part of {target}"
  if not target.mlm and name.startswith(dialect.mlm_modules):
    return f"MLM head, not part of {target}"
  return None


@dataclasses.dataclass(frozen=True)
class ImportResult:
  """An imported model and the accounting of every tensor and parameter.

  Attributes:
    config: the architecture read from config.json.
    params: float32 numpy parameters, in the layout `config.scan_layers` asks for.
    task: "mlm" (`BertForMaskedLM` params), "base" (`BertModel` params), or a fine-tuning
      task kind (`import_hf_task`: classification, regression, ner, qa).
    source: the weights file read.
    used: source tensors that became parameters.
    ignored: source tensors left out, each with the reason.
    initialised: parameters absent from the source, freshly initialised.
    model: the jaxfm model class the params are for.
    label_names: a classification or token classification head's labels (None otherwise).
  """

  config: BertConfig
  params: Params
  task: str
  source: str
  used: list[str]
  ignored: dict[str, str]
  initialised: list[str]
  model: str
  label_names: list[str] | None = None  # a classifier's, from id2label in id order

  def summary(self) -> str:
    lines = [f"imported {self.source} as jaxfm {self.model}: {len(self.used)} tensors used, "
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
  config, dialect, padded, _ = _read_config(hf_dir)
  source, raw = _read_checkpoint(hf_dir)
  tensors, origin = _canonical(raw, dialect, source)
  if task == "auto":
    task = "mlm" if any(n.startswith(dialect.mlm_modules) for n in tensors) else "base"
  mlm = task == "mlm"
  check_head_activation(config, dialect, mlm)
  flat, used, missing = _convert(param_rules(config, dialect, pooler=not mlm, mlm=mlm,
                                             padded=padded),
                                 _param_shapes(config, mlm), tensors, origin, source)
  target = _Target("BertForMaskedLM" if mlm else "BertModel", task, not mlm, mlm)
  ignored, unexpected = _unused(tensors, origin, set(used), dialect, target, source)
  head = "mlm_head/" if mlm else "encoder/pooler/"
  initialised = [p for p in missing if p.startswith(head)] if init_missing_head else []
  _check_complete(missing, initialised, unexpected, head, source)
  if initialised:
    fresh = _initial_head(config, mlm)
    flat.update({p: fresh[p] for p in initialised})
  params = unflatten(flat)
  if scan_layers:
    params = stack_layers(params)
  return ImportResult(config.replace(scan_layers=scan_layers), params, task, source, used,
                      ignored, initialised, target.model)


def import_hf_task(hf_dir: str, task: str) -> ImportResult:
  """Reads a fine-tuned Hugging Face BERT task model (encoder and task head) into the
  unscanned params of jaxfm's task model for `task` (a key of `TASK_HEADS`).

  A sequence classifier with one output or `problem_type` "regression" becomes task
  "regression"; a classifier's labels are config.json's `id2label` in id order.

  Raises:
    InteropError: another architecture than `task` reads, labels that do not fit the head,
      unreadable or misshapen tensors, tensors missing or left unused.
  """
  if task not in TASK_HEADS:
    raise InteropError(f"task {task!r} is not one of {tuple(TASK_HEADS)}")
  head = TASK_HEADS[task]
  config, dialect, padded, hf_config = _read_config(hf_dir)
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  found = hf_config.get("architectures") or []
  if found != [head.architecture]:
    raise InteropError(f"{config_path}: --task={task} imports {head.architecture}, but the "
                       f"checkpoint's architectures are {found}")
  source, raw = _read_checkpoint(hf_dir)
  tensors, origin = _canonical(raw, dialect, source)
  weight = f"{head.module}.weight"
  if weight not in tensors:
    raise InteropError(f"{source}: missing tensor {weight}, the {head.architecture} head")
  outputs = tensors[weight].shape[0]  # torch Linear weight [outputs, hidden]
  problem = hf_config.get("problem_type")
  if problem not in (None, "single_label_classification", "regression"):
    raise InteropError(f"{config_path}: problem_type {problem!r} has no jaxfm task "
                       "(single_label_classification or regression)")
  regression = head is SEQUENCE_HEAD and (problem == "regression" or outputs == 1)
  if regression and outputs != 1:
    raise InteropError(f"{source}: a regression head with {outputs} outputs ({weight}); "
                       "jaxfm's regression predicts one score")
  labels = (labels_from_hf(hf_config, outputs, config_path)
            if head.path == "classifier" and not regression else None)
  shapes = {p: s for p, s in _param_shapes(config, False).items()
            if head.pooler or not p.startswith("encoder/pooler/")}
  shapes.update({f"{head.path}/kernel": (config.hidden_size, outputs),
                 f"{head.path}/bias": (outputs,)})
  rules = param_rules(config, dialect, pooler=head.pooler, mlm=False, padded=padded)
  flat, used, missing = _convert(rules + linear(head.path, head.module), shapes, tensors,
                                 origin, source)
  kind = "regression" if regression else task
  target = _Target(head.architecture, kind, head.pooler, False)
  ignored, unexpected = _unused(tensors, origin, set(used), dialect, target, source)
  _check_complete(missing, [], unexpected, None, source)
  return ImportResult(config, unflatten(flat), kind, source, used, ignored, [],
                      head.architecture, labels)


def _read_config(hf_dir: str) -> tuple[BertConfig, Dialect, bool, dict]:
  """The architecture and naming dialect of an HF model dir's config.json, whether a
  pruned model's tensors hold its pruned heads as zeros (`hf_names.heads_padded`), and the
  config.json itself."""
  config_path = os.path.join(hf_dir, CONFIG_FILE)
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except json.JSONDecodeError as e:
    raise InteropError(f"{config_path}: not valid JSON ({e})") from None
  dialect = dialect_of(hf_config, config_path)
  return (config_from_hf(hf_config, dialect, config_path), dialect, heads_padded(hf_config),
          hf_config)


def _convert(rules: Sequence[Rule], shapes: Mapping[str, tuple[int, ...]],
             tensors: Mapping[str, np.ndarray], origin: Mapping[str, str], source: str
             ) -> tuple[dict[str, np.ndarray], list[str], dict[str, list[str]]]:
  """(flat params, source tensors used, {param: its absent source tensors}) by `rules`."""
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
  return flat, used, missing


def _unused(tensors: Mapping[str, np.ndarray], origin: Mapping[str, str], used: set[str],
            dialect: Dialect, target: _Target, source: str) -> tuple[dict[str, str], list[str]]:
  """The source tensors no parameter used: ({ignored: why}, [unexpected])."""
  ignored, unexpected = {}, []
  for name in tensors:
    if origin[name] in used:
      continue
    reason = _ignore_reason(name, tensors, origin, dialect, target, source)
    if reason is None:
      unexpected.append(origin[name])
    else:
      ignored[origin[name]] = reason
  return ignored, unexpected


def _check_complete(missing: Mapping[str, list[str]], initialised: Sequence[str],
                    unexpected: Sequence[str], head: str | None, source: str) -> None:
  """Raises naming the tensors a parameter lacks (unless initialised) or no parameter takes;
  `head`: the params' prefix that `init_missing_head` could fill (None: nothing could)."""
  unfilled = [p for p in missing if p not in initialised]
  problems = []
  if unfilled:
    names = list(dict.fromkeys(s for p in unfilled for s in missing[p]))
    hint = (" (the checkpoint has no such head; pass init_missing_head to initialise it)"
            if head and all(p.startswith(head) for p in unfilled) else "")
    problems.append(f"missing tensor(s) {_names(names)}{hint}")
  if unexpected:
    problems.append(f"unexpected tensor(s) {_names(unexpected)}")
  if problems:
    raise InteropError(f"{source}: {'; '.join(problems)}")


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


def _export_rules(flat: Mapping[str, np.ndarray], config: BertConfig, dialect: Dialect,
                  mlm: bool, pooler: bool, head: TaskHead | None) -> list[Rule]:
  """The rules that write `flat` in `dialect`, after checking it is a model HF has."""
  if head and (mlm or dialect is not BERT):
    raise InteropError(f"a {head.path!r} head can be written only as a BERT task model "
                       f"({head.architecture}), not beside an MLM head or in "
                       f"{dialect.model_type} naming (factorised embeddings)")
  if pooler and (mlm or not dialect.has_pooler):
    raise InteropError(f"params with a pooler cannot be written as "
                       f"{dialect.architectures[mlm]}, which has none")
  check_head_activation(config, dialect, mlm)
  rules = param_rules(config, dialect, pooler=pooler, mlm=mlm)
  expected = {**_param_shapes(config, False), **_param_shapes(config, True)}
  if head:
    rules += linear(head.path, head.module)
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
  return rules


def _hf_name(name: str, dialect: Dialect) -> str:
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
  dialect = ELECTRA if config.embedding_dim != config.hidden_size else BERT
  mlm = any(p.startswith("mlm_head/") for p in flat)
  pooler = any(p.startswith("encoder/pooler/") for p in flat)
  head = task_head(flat, pooler)
  rules = _export_rules(flat, config, dialect, mlm, pooler, head)
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
  hf_config = config_to_hf(config, dialect, architecture)
  if head and head.path == "classifier":
    hf_config.update(labels_to_hf(flat["classifier/kernel"].shape[-1], label_names))
  with atomic_directory(out_dir) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(tensors, os.path.join(tmp, SAFETENSORS_FILE),
                                metadata={"format": "pt"})
    copied = copy_tokenizer_files(tokenizer_files(tokenizer_dir), tmp)
  return ExportResult(os.path.abspath(out_dir), architecture, origins, copied)
