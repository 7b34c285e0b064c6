"""huggingface/peft's adapter folder: `adapter_config.json` + `adapter_model.safetensors`.

A LoRA, AdaLoRA or IA³ adapter of a jaxfm task model is written under transformers' BERT module
names (`base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight`), the trained task
head as `modules_to_save`, so that `peft.PeftModel.from_pretrained(BertFor...(base), DIR)`
computes what jaxfm computes. Each listed module is named in full (`bert.encoder.layer.0.
output.dense`), because peft matches names by suffix and `output.dense` also ends
`attention.output.dense`. AdaLoRA is written as peft saves it after rank allocation: each
module keeps only its triplets with E != 0 (lora_A [rank, in], lora_E [rank, 1], lora_B [out,
rank]) and `rank_pattern` in the config says which of its init_r they were.

Prompt and prefix tuning are peft's PROMPT_TUNING and PREFIX_TUNING: one `prompt_embeddings`
table (the soft prompt [virtual, hidden], or the prefix [virtual, layers * 2 * hidden] with a
reparameterising MLP already applied), for `BertForSequenceClassification` only: peft's token
classification runs the prompt's positions through the head, and its prefix tuning passes
`past_key_values`, which transformers' BERT heads do not take.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
import safetensors.numpy

from jaxfm import peft
from jaxfm.interop.checkpoint_dir import atomic_directory
from jaxfm.interop.hf_names import InteropError, task_head
from jaxfm.models import BertConfig
from jaxfm.peft import adalora, ia3, prefix
from jaxfm.trees import flatten

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_PROMPT_PREFIX = "base_model."  # prompt learning wraps the transformers model directly
_ENCODER = "bert."
_TASK_TYPES = {"BertForSequenceClassification": "SEQ_CLS",
               "BertForTokenClassification": "TOKEN_CLS",
               "BertForQuestionAnswering": "QUESTION_ANS"}
TASK_KINDS = {"SEQ_CLS": "classification", "TOKEN_CLS": "ner", "QUESTION_ANS": "qa"}  # jaxfm's


def _lora_tensors(site: peft.Site, leaves: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """torch Linear layout: lora_A [r, in], lora_B [out, r] (jaxfm: A [*in, r], B [r, *out])."""
  a, b = leaves["lora_a"], leaves["lora_b"]
  r = a.shape[-1]
  return {"lora_A.weight": a.reshape(-1, r).T, "lora_B.weight": b.reshape(r, -1).T}


def _ia3_tensors(site: peft.Site, leaves: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """ia3_l [1, in] for input-scaled modules, else [out, 1]."""
  scale = leaves["scale"].reshape(-1)
  return {"ia3_l": scale[None, :] if ia3.scales_input(site) else scale[:, None]}


def _adalora_tensors(site: peft.Site, leaves: Mapping[str, np.ndarray]
                     ) -> dict[str, np.ndarray]:
  """The kept triplets (E != 0) in peft's layout: lora_A [rank, in], lora_E [rank, 1], lora_B
  [out, rank] (jaxfm: A [*in, r], E [r], B [r, *out])."""
  a, e, b = leaves["lora_a"], leaves[adalora.E], leaves["lora_b"]
  r, kept = e.shape[-1], e != 0
  return {"lora_A": a.reshape(-1, r).T[kept], "lora_E": e[kept][:, None],
          "lora_B": b.reshape(r, -1).T[:, kept]}


_TENSORS = {"lora": _lora_tensors, "adalora": _adalora_tensors, "ia3": _ia3_tensors}
_PROMPT_TABLES = {"prompt": lambda adapter: adapter["prompt"], "prefix": prefix.table}


def _head_modules(head: Mapping[str, np.ndarray], pooler: bool) -> tuple[str, dict[str, str]]:
  """The HF architecture and {jaxfm linear path: HF module} of the trained non-adapter params."""
  found = task_head(head, pooler)
  if found is None and not head:
    raise InteropError("the run trained no task head (its init_from brought one, frozen with "
                       "the base): peft's format carries the head in modules_to_save; export "
                       "the run merged with --to_hf (lora, adalora, ia3)")
  if found is None:
    raise InteropError(f"no task head among the trained params {sorted(head)}")
  modules = {found.path: found.module, "encoder/pooler": _ENCODER + "pooler.dense"}
  unknown = sorted(n for n in head if n.rsplit("/", 1)[0] not in modules
                   or n.rsplit("/", 1)[1] not in ("kernel", "bias"))
  if unknown:
    raise InteropError(f"trained params without a peft modules_to_save equivalent: {unknown}")
  return found.architecture, {p: m for p, m in modules.items() if f"{p}/kernel" in head}


def export_peft(plan: peft.Plan, trainable: Any, frozen: Any, config: BertConfig, out_dir: str,
                base_model: str, label_names: Sequence[str] | None = None,
                total_step: int = 0) -> str:
  """Writes the adapter and head of a PEFT run (host arrays) as a peft adapter folder
  (atomically); returns a report line. `total_step` is the run's train.steps (AdaLoRA's
  config needs it).

  Raises:
    InteropError: a method, model or head peft cannot load.
  """
  if not plan.method.peft_type:
    raise InteropError(f"peft.method={plan.method.name!r} has no peft format")
  if config.embedding_dim != config.hidden_size:
    raise InteropError("a model with factorised embeddings (ELECTRA naming) has no peft export")
  base = flatten(frozen)
  head = {k: np.asarray(v) for k, v in flatten(trainable["head"]).items()}
  architecture, head_modules = _head_modules(head, "encoder/pooler/kernel" in {**base, **head})
  if plan.method.name in _PROMPT_TABLES:
    if architecture != "BertForSequenceClassification":
      raise InteropError(f"peft.method={plan.method.name!r} exports for sequence classification "
                         f"only: peft's {architecture} does not compute what jaxfm does")
    table = np.asarray(_PROMPT_TABLES[plan.method.name](trainable["adapter"]))
    tensors, prefix_key = {"prompt_embeddings": table}, _PROMPT_PREFIX
    adapter_config = _prompt_config(plan, config, sorted(head_modules.values()), base_model)
    modules = 0
  else:
    tensors, targets, fields = _site_tensors(plan, trainable["adapter"], frozen)
    prefix_key = _PREFIX
    adapter_config = {**_config(plan, targets, sorted(head_modules.values()),
                                _TASK_TYPES[architecture], base_model, total_step), **fields}
    modules = len(targets)
  for path, module in head_modules.items():
    tensors[f"{prefix_key}{module}.weight"] = np.ascontiguousarray(head[f"{path}/kernel"].T)
    tensors[f"{prefix_key}{module}.bias"] = head[f"{path}/bias"]
  with atomic_directory(out_dir) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(adapter_config, f, indent=2, sort_keys=True)
    safetensors.numpy.save_file(tensors, os.path.join(tmp, WEIGHTS_FILE),
                                metadata={"format": "pt"})
  outputs = head[f"{task_head(head, False).path}/kernel"].shape[-1]
  labels = f", labels {list(label_names)}" if label_names else ""
  return (f"exported a {plan.method.peft_type} adapter ({modules} modules, "
          f"{sum(math.prod(t.shape) for t in tensors.values())} params with the head) to "
          f"{os.path.abspath(out_dir)}: load it with peft.PeftModel.from_pretrained("
          f"transformers.{architecture}.from_pretrained(BASE, num_labels={outputs}), DIR), "
          f"BASE = {base_model or 'the init_from model as a Hugging Face folder'}{labels}")


def _site_tensors(plan: peft.Plan, trainable_adapter: Any, frozen: Any
                  ) -> tuple[dict[str, np.ndarray], list[str], dict[str, Any]]:
  """A weight method's tensors under transformers' module names, its target modules and the
  config fields that list modules: IA³'s input-scaled `feedforward_modules`, AdaLoRA's
  `rank_pattern` (per module, which triplets are kept)."""
  adapter = flatten(trainable_adapter)
  scanned = peft.num_scanned(flatten(frozen))
  tensors: dict[str, np.ndarray] = {}
  targets, input_scaled, ranks = [], [], {}
  for site in plan.sites(frozen):
    leaves = {k.rsplit("/", 1)[1]: np.asarray(v) for k, v in adapter.items()
              if k.rsplit("/", 1)[0] == site.adapter}
    for layer, module in enumerate(site.hf_modules(scanned)):
      own = {k: v[layer] if site.lead else v for k, v in leaves.items()}
      for suffix, value in _TENSORS[plan.method.name](site, own).items():
        tensors[f"{_PREFIX}{_ENCODER}{module}.{suffix}"] = np.ascontiguousarray(value)
      targets.append(_ENCODER + module)
      if plan.method.name == "ia3" and ia3.scales_input(site):
        input_scaled.append(_ENCODER + module)
      if plan.method.name == "adalora":
        ranks[f"{_ENCODER}{module}.lora_E"] = (own[adalora.E] != 0).tolist()
  fields = {"ia3": {"feedforward_modules": input_scaled}, "adalora": {"rank_pattern": ranks}}
  return tensors, targets, fields.get(plan.method.name, {})


def _prompt_config(plan: peft.Plan, config: BertConfig, modules_to_save: list[str],
                   base_model: str) -> dict[str, Any]:
  """peft's PromptTuningConfig / PrefixTuningConfig (inference mode: the table as saved)."""
  common = {"peft_type": plan.method.peft_type, "task_type": "SEQ_CLS",
            "num_virtual_tokens": plan.settings.num_virtual_tokens,
            "token_dim": config.hidden_size, "num_transformer_submodules": 1,
            "num_attention_heads": config.num_heads, "num_layers": config.num_layers,
            "modules_to_save": modules_to_save, "base_model_name_or_path": base_model,
            "inference_mode": True}
  if plan.method.name == "prompt":
    return {**common, "prompt_tuning_init": "RANDOM"}
  return {**common, "encoder_hidden_size": config.hidden_size, "prefix_projection": False}


def _config(plan: peft.Plan, targets: list[str], modules_to_save: list[str], task_type: str,
            base_model: str, total_step: int) -> dict[str, Any]:
  common = {"peft_type": plan.method.peft_type, "task_type": task_type,
            "target_modules": targets, "modules_to_save": modules_to_save,
            "base_model_name_or_path": base_model, "inference_mode": True,
            "fan_in_fan_out": False}
  s = plan.settings
  if plan.method.name == "lora":
    return {**common, "r": s.rank, "lora_alpha": s.alpha, "use_rslora": s.rslora,
            "lora_dropout": s.dropout, "bias": "none", "init_lora_weights": True}
  if plan.method.name == "adalora":
    return {**common, "init_r": s.init_r, "target_r": s.target_r, "lora_alpha": s.alpha,
            "lora_dropout": s.dropout, "tinit": s.tinit, "tfinal": s.tfinal, "deltaT": s.deltaT,
            "beta1": s.beta1, "beta2": s.beta2, "orth_reg_weight": s.orth_reg_weight,
            "total_step": total_step, "bias": "none", "init_lora_weights": True}
  return {**common, "init_ia3_weights": True}
