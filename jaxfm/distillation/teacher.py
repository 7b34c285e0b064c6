"""The teacher: a jaxfm fine-tuning workdir's task model and params, frozen (or, for
task-agnostic distillation, an MLM checkpoint).

A teacher that computes through int8 rounding, an int8 folder (`jaxfm.quantize`) or a
quantization-aware run (`quantize.qat`), runs as `evaluate` scores it: its params are the int8
model's values (int8 x scale, which an every-k student starts from too) and its task computes
in that model's mode (`Teacher.int8_mode`; w8a8 also rounds each matmul's activations).

The distilled run's config names the teacher by path (`teacher`) and records the sha256 of its
params (`distill.teacher_sha256`); a resumed run whose teacher changed is refused.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from jaxfm import config as config_lib
from jaxfm import compress, interop, peft, weights
from jaxfm import workdir as workdir_lib
from jaxfm.finetuning import run as finetuning
from jaxfm.models import BertConfig


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A fine-tuned teacher on this host: architecture (its layers called one by one, compute in
  `distill.teacher_dtype`), params (numpy, unscanned, as saved), labels and tokenizer."""

  path: str
  config: BertConfig
  params: Any
  label_names: list[str] | None
  tokenizer: Any
  sha256: str
  source: str  # which checkpoint the params came from
  int8_mode: str = ""  # '' float; else the int8 mode its task computes in (`compress.MODES`)


def _params(path: str, run_cfg: ml_collections.ConfigDict) -> tuple[Any, str, str]:
  """The workdir's best (else latest) params, where they came from and the int8 mode they run
  in: a PEFT run's with its adapter merged; an int8 model's dequantized (`compress.runs_int8`)."""
  if finetuning.is_peft_run(run_cfg):
    adapted = finetuning.adapted(path)
    return adapted.merged(), adapted.source, ""
  if compress.runs_int8(path, run_cfg):
    model = compress.int8_model(path)
    return model.dequantized(), model.describe(), model.mode
  loaded = weights.workdir_params(path)
  return loaded.params, loaded.describe(), ""


def load_teacher(cfg: ml_collections.ConfigDict) -> Teacher:
  """Reads `cfg.teacher` and checks it against the run: its task kind, and the params hash
  the config recorded (when resuming).

  Raises:
    ConfigError: naming `teacher` (not a fine-tuning workdir, another task, changed params).
  """
  path = cfg.teacher
  if path.startswith("hf:"):
    task = "classification" if cfg.task == "regression" else cfg.task
    config_lib.fail("teacher", path, f"is a Hugging Face folder: import its fine-tuned model as "
                    f"a workdir with python -m jaxfm.convert --from_hf={path[3:]} --out=WORKDIR "
                    f"--task={task}, and name that WORKDIR")
  run = finetuning.load_finetuned("teacher", path, cfg.task)
  params, source, int8_mode = _params(path, run.cfg)
  config = config_lib.bert_config(run.cfg, jax.devices()[0].platform).replace(
      scan_layers=False, remat_policy="none", dtype=cfg.distill.teacher_dtype)
  params = weights.in_layout(params, config)
  return Teacher(path, config, params, run.label_names, run.tokenizer, _checked(cfg, params),
                 source, int8_mode)


def load_mlm_teacher(cfg: ml_collections.ConfigDict) -> tuple[Teacher, str | None]:
  """Reads `cfg.teacher`, an MLM checkpoint ('hf:DIR', a jaxfm model dir or a pretraining
  workdir), checked as `load_teacher`'s; returns it and its tokenizer folder (None if none).

  Raises:
    ConfigError: naming `teacher` (unreadable, changed params).
  """
  path = cfg.teacher
  try:
    if path.startswith("hf:"):  # a folder without an MLM head is refused, not filled in
      result = interop.import_hf(path[3:], task="mlm")
      source = weights.Weights(result.config, result.params, path[3:])
    else:
      source = weights.load_jaxfm(path)
  except (FileNotFoundError, ValueError, workdir_lib.WorkdirError) as e:
    config_lib.fail("teacher", path, f"is not readable: {e}")
  if "mlm_head" not in source.params:
    config_lib.fail("teacher", path, "has no MLM head: task-agnostic distillation learns the "
                    "teacher's masked-token predictions")
  config = source.config.replace(scan_layers=False, remat_policy="none",
                                 dtype=cfg.distill.teacher_dtype)
  params = weights.in_layout(source.params, config)
  teacher = Teacher(path, config, params, None, None, _checked(cfg, params),
                    source.origin or path)
  return teacher, source.tokenizer_dir


def _checked(cfg: ml_collections.ConfigDict, params: Any) -> str:
  """The params' sha256, recorded in `distill.teacher_sha256`; ConfigError naming `teacher`
  when the config recorded another (a resumed run whose teacher changed)."""
  digest = peft.base_sha256(params)
  recorded = cfg.distill.teacher_sha256
  if recorded and recorded != digest:
    config_lib.fail("teacher", cfg.teacher, f"changed: its params have sha256 {digest}, the run "
                    f"was distilled from distill.teacher_sha256={recorded}")
  with cfg.unlocked():
    cfg.distill.teacher_sha256 = digest
  return digest
