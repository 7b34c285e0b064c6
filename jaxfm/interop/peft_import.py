"""A huggingface/peft LoRA adapter folder for a BERT base, read into jaxfm's PEFT tree.

The reverse of `jaxfm.interop.peft_format`: `adapter_config.json` + `adapter_model.safetensors`
(transformers' BERT module names, the task head in `modules_to_save`) become the trainable tree
`{'adapter': LoRA A/B per site, 'head': the head}` of a `lora` plan over that base, so that a
jaxfm PEFT workdir computes what `peft.PeftModel.from_pretrained(BertFor...(base), DIR)` does.
`import_workdir` writes that workdir: `init_from=hf:BASE` with the base's content hash, the
peft section from the adapter's config, the tree as its best checkpoint (step 0), so that
`evaluate` (with `--input`), `predict` and `convert --to_hf / --to_peft` take it as a run.
Only what jaxfm's LoRA can express imports; anything else (another adapter type, DoRA,
per-module ranks, some layers only, a module jaxfm has no target for) is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import jax
import numpy as np
import safetensors.numpy

from jaxfm import config as config_lib
from jaxfm import peft, sharding, weights
from jaxfm.interop import imported_workdir
from jaxfm.interop.hf_names import InteropError
from jaxfm.interop.peft_format import CONFIG_FILE, TASK_KINDS, WEIGHTS_FILE
from jaxfm.models import unstack_layers
from jaxfm.tasks import make_task
from jaxfm.trees import flatten, unflatten

_LORA_KEY = re.compile(r"^bert\.encoder\.layer\.(\d+)\.(.+)\.lora_([AB])\.weight$")
# modules_to_save: transformers' module -> jaxfm's params ({path}/kernel, {path}/bias).
HEAD_MODULES = {"classifier": "classifier", "qa_outputs": "span",
                "bert.pooler.dense": "encoder/pooler"}
# adapter_config.json fields jaxfm's LoRA has no equivalent for, with the value that means none.
_UNSUPPORTED = {"use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "layers_pattern": None, "bias": "none",
                "fan_in_fan_out": False, "lora_bias": False, "target_parameters": None,
                "trainable_token_indices": None, "layer_replication": None, "use_qalora": False,
                "alora_invocation_tokens": None, "megatron_config": None}


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
  """A peft LoRA folder, checked: jaxfm's settings and task, and its tensors by module."""

  settings: peft.Settings
  task: str  # jaxfm's task kind
  lora: dict[tuple[int, str], dict[str, np.ndarray]]  # (layer, target name): {'A' [r, in], 'B'}
  head: dict[str, np.ndarray]  # transformers' module.weight / .bias of modules_to_save


def read_lora(adapter_dir: str) -> LoraAdapter:
  """Reads and checks a peft LoRA folder.

  Raises:
    InteropError: a missing file, or anything jaxfm's LoRA cannot express (named).
  """
  config_path, weights_path = (os.path.join(adapter_dir, f) for f in (CONFIG_FILE, WEIGHTS_FILE))
  for path in (config_path, weights_path):
    if not os.path.isfile(path):
      raise InteropError(f"{adapter_dir} is not a peft adapter folder: {path} is missing")
  with open(config_path) as f:
    config = json.load(f)
  source = f"{config_path}:"
  if config.get("peft_type") != "LORA":
    raise InteropError(f"{source} peft_type {config.get('peft_type')!r} is not supported: "
                       "only LORA adapters import")
  if config.get("task_type") not in TASK_KINDS:
    raise InteropError(f"{source} task_type {config.get('task_type')!r}: choose one of "
                       f"{', '.join(TASK_KINDS)}")
  for field, none in _UNSUPPORTED.items():
    if config.get(field, none) not in (none, [], {}, None):
      raise InteropError(f"{source} {field}={config[field]!r} is not supported by jaxfm's LoRA")
  tensors = {k.removeprefix("base_model.model."): v
             for k, v in safetensors.numpy.load_file(weights_path).items()}
  lora, head = {}, {}
  hf_targets = {t.hf_module: t.name for t in peft.TARGETS.values()}
  for key, value in tensors.items():
    match = _LORA_KEY.match(key)
    if match:
      layer, module, part = int(match.group(1)), match.group(2), match.group(3)
      if module not in hf_targets:
        raise InteropError(f"{source} LoRA on {key.rsplit('.', 2)[0]}: jaxfm adapts only "
                           f"{', '.join(sorted(hf_targets))} in each layer")
      lora.setdefault((layer, hf_targets[module]), {})[part] = value
    elif key.rsplit(".", 1)[0] in HEAD_MODULES:
      head[key] = value
    else:
      raise InteropError(f"{source} tensor {key} is neither LoRA on a BERT layer's projection "
                         f"nor a head jaxfm has ({', '.join(HEAD_MODULES)})")
  if not lora:
    raise InteropError(f"{source} the adapter holds no LoRA tensors")
  # lora_A [r, in], lora_B [out, r]
  ranks = {t.shape[0] if p == "A" else t.shape[1] for v in lora.values() for p, t in v.items()}
  if len(ranks) != 1:
    raise InteropError(f"{source} its modules' ranks differ ({sorted(ranks)}): jaxfm's LoRA "
                       "has one")
  settings = peft.Settings(
      "lora", rank=ranks.pop(), alpha=float(config["lora_alpha"]),
      dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")),
      target_modules=",".join(t.name for t in peft.TARGETS.values()
                              if any(target == t.name for _, target in lora)))
  return LoraAdapter(settings, TASK_KINDS[config["task_type"]], lora, head)


def trainable_tree(adapter: LoraAdapter, plan: peft.Plan, frozen: Any, abstract: Any
                   ) -> dict[str, Any]:
  """The plan's trainable tree (numpy, shaped like `abstract`, the tree `plan.trainable` makes)
  from `adapter`.

  Raises:
    InteropError: a layer without one of the targets or beyond the base's, a head that is
      missing or misshapen.
  """
  scanned = peft.num_scanned(flatten(frozen))
  tree, taken = {}, set()
  for site in plan.sites(frozen):
    shapes = {k.rsplit("/", 1)[1]: v.shape for k, v in flatten(abstract["adapter"]).items()
              if k.rsplit("/", 1)[0] == site.adapter}
    per_layer = []
    for module in site.hf_modules(scanned):
      layer = int(module.split(".")[2])
      found = adapter.lora.get((layer, site.target.name))
      if found is None or set(found) != {"A", "B"}:
        raise InteropError(f"the adapter has no lora_A and lora_B on bert.{module}: jaxfm adapts "
                           "the same projections in every layer")
      per_layer.append(found)
      taken.add((layer, site.target.name))
    for name, part in (("lora_a", "A"), ("lora_b", "B")):
      shape = shapes[name][site.lead:]  # A [*in, r]; B [r, *out]
      # torch Linear layout: A [r, in], B [out, r].
      arrays = [t[part].T.reshape(shape) for t in per_layer]
      tree[f"{site.adapter}/{name}"] = np.stack(arrays) if site.lead else arrays[0]
  if set(adapter.lora) - taken:
    raise InteropError(f"the adapter adapts layers the base lacks: "
                       f"{sorted(set(adapter.lora) - taken)} (layer, target)")
  head, used = {}, set()
  for name, shape in flatten(abstract["head"]).items():
    path, leaf = name.rsplit("/", 1)
    module = next((m for m, p in HEAD_MODULES.items() if p == path), path)
    key = f"{module}.{'weight' if leaf == 'kernel' else 'bias'}"
    if key not in adapter.head:
      raise InteropError(f"the base lacks {name} and the adapter's modules_to_save has no "
                         f"{key} to give it")
    value = adapter.head[key].T  # torch Linear weight [out, in] -> kernel [in, out]
    if value.shape != shape.shape:
      raise InteropError(f"modules_to_save {key}: shape {adapter.head[key].shape} does not fit "
                         f"{name} {shape.shape}")
    head[name], used = value, used | {key}
  if set(adapter.head) - used:
    raise InteropError(f"modules_to_save {sorted(set(adapter.head) - used)}: the base has "
                       "these params and jaxfm keeps them frozen")
  return {"adapter": unflatten(tree), "head": unflatten(head)}


def head_outputs(adapter: LoraAdapter) -> int:
  """How many outputs the adapter's task head has (labels; 2 for a QA span head)."""
  for module in ("classifier", "qa_outputs"):
    if f"{module}.weight" in adapter.head:
      return adapter.head[f"{module}.weight"].shape[0]
  raise InteropError("the adapter's modules_to_save has no task head (classifier or qa_outputs)")


def import_workdir(adapter_dir: str, base_dir: str, out: str,
                   label_names: Sequence[str] | None = None) -> str:
  """Writes the jaxfm LoRA workdir `out` for the peft adapter at `adapter_dir` over the
  Hugging Face BERT at `base_dir`; returns a report. Labels are `label_names`, else 0 ... n-1.

  Raises:
    InteropError: an adapter jaxfm's LoRA cannot express, labels that do not fit its head, a
      non-empty `out`.
  """
  adapter = read_lora(adapter_dir)
  imported_workdir.require_empty(out)
  init_from = f"hf:{os.path.abspath(base_dir)}"
  source = weights.read_pretrained(init_from, "auto")
  cfg = imported_workdir.run_config(adapter.task, init_from, source.config)
  s = adapter.settings
  cfg.peft.update(method=s.method, rank=s.rank, alpha=s.alpha, dropout=s.dropout,
                  rslora=s.rslora, target_modules=s.target_modules)
  tokenizer = imported_workdir.hf_tokenizer(base_dir, cfg)
  labels = None
  if cfg.task != "qa":
    outputs = head_outputs(adapter)
    labels = list(label_names or map(str, range(outputs)))
    if len(labels) != outputs:
      raise InteropError(f"--labels names {len(labels)} labels; the adapter's head has {outputs}")
  model_config = config_lib.bert_config(cfg, "cpu")
  task = make_task(cfg.task, model_config, labels, None, cfg.data)
  shapes = sharding.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
  # The frozen base as a run rebuilds it (`jaxfm.finetuning.run.peft_base`); a pooler the base
  # has and the adapter saves trains in full.
  provided = weights.provided_params(source.params, model_config, shapes)
  if "bert.pooler.dense.weight" in adapter.head and "encoder/pooler/kernel" in provided:
    cfg.peft.modules_to_save = "pooler"
  plan = peft.Plan(peft.Settings.of(cfg.peft), frozenset(provided))
  frozen = plan.frozen(unflatten(provided))
  cfg.peft.base_sha256 = peft.base_sha256(unstack_layers(frozen))
  trainable = trainable_tree(adapter, plan, frozen,
                             jax.eval_shape(plan.trainable, shapes, jax.random.key(0)))
  imported_workdir.write(out, cfg, labels, tokenizer, trainable)
  return (f"imported a LORA adapter (r={s.rank}, alpha={s.alpha:g}, {s.target_modules}, "
          f"{len(adapter.lora)} modules, labels {labels}) as the {cfg.task} workdir "
          f"{os.path.abspath(out)} over {cfg.init_from}")
