"""A jaxfm fine-tuning workdir written from an imported checkpoint rather than trained.

Both imports (`peft_import`: a peft adapter over an HF base; `hf_task_import`: a fine-tuned HF
task model) write the same run files a fine-tuning run does, with the imported params as the
best checkpoint at step 0 (its one metric IMPORTED), so that `evaluate`, `predict`, `convert`,
`quantize`, `prune` and `distill --config.teacher` read the folder as a run.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import ml_collections

from jaxfm import config as config_lib
from jaxfm import workdir as workdir_lib
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.interop.checkpoint_dir import tokenizer_files
from jaxfm.interop.hf_names import InteropError
from jaxfm.models import BertConfig
from jaxfm.train import best

IMPORTED = "imported"  # the best checkpoint's only metric: it was imported, not scored
_TOKENIZER_CONFIG = "tokenizer_config.json"


def require_empty(out: str) -> None:
  if os.path.isdir(out) and os.listdir(out):
    raise InteropError(f"--out={out} is not empty")


def run_config(task: str, init_from: str, architecture: BertConfig) -> ml_collections.ConfigDict:
  """Fine-tuning defaults for `task` over `architecture`, rows as long as its position table
  allows and one length bucket (there is no training set to plan lengths from)."""
  cfg = config_lib.finetune_defaults()
  cfg.task, cfg.init_from = task, init_from
  config_lib.take_architecture(cfg, architecture)
  cfg.data.max_seq_length = min(cfg.data.max_seq_length, cfg.model.max_position_embeddings)
  cfg.data.length_buckets = str(cfg.data.max_seq_length)
  return cfg


def hf_tokenizer(hf_dir: str, cfg: ml_collections.ConfigDict) -> Any:
  """The tokenizer of the HF folder `hf_dir`; a bare vocab.txt is lowercased as its
  tokenizer_config.json's `do_lower_case` says (recorded in `cfg.data.lowercase`)."""
  if not tokenizer_files(hf_dir):
    raise InteropError(f"{hf_dir} has no tokenizer files (vocab.txt) for the workdir")
  settings_path = os.path.join(hf_dir, _TOKENIZER_CONFIG)
  if os.path.isfile(settings_path):
    with open(settings_path) as f:
      cfg.data.lowercase = bool(json.load(f).get("do_lower_case", cfg.data.lowercase))
  return load_tokenizer(hf_dir, lowercase=cfg.data.lowercase)


def write(out: str, cfg: ml_collections.ConfigDict, label_names: Sequence[str] | None,
          tokenizer: Any, params: Any) -> None:
  """Writes the run files and `params` as the best checkpoint at step 0."""
  workdir_lib.prepare_workdir(out, cfg, allow_config_change=False)
  workdir_lib.write_resolved_config(out, cfg)
  workdir_lib.save_run_files(out, cfg.task, label_names, tokenizer)
  keeper = best.BestCheckpoint(out, IMPORTED, "max", 0, 1)
  keeper.update(0, params, {IMPORTED: 1.0})
  keeper.close()
