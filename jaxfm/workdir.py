"""Every file a run folder (workdir) holds, written and read here.

  config.json     the resolved config and package versions; guards a resume against a change
  task.json       fine-tuning: the task kind and its label vocabulary
  tokenizer/      the run's tokenizer (trained, or copied from `init_from`)
  checkpoints/    Orbax steps of the train state (`jaxfm.train.checkpoint`)
  best/           fine-tuning: the best evaluation's params (`jaxfm.train.best`)
  metrics.jsonl   one JSON line per logged step and split (`jaxfm.train.writer`); on an object
                  store one file per run segment instead, metrics-<start step>.jsonl
  tensorboard/    TensorBoard events
  compile_cache/  XLA's persistent compilation cache (`jaxfm.runtime.use_compilation_cache`)
  DONE            the run reached `train.steps` (or stopped early): nothing left to train
  wandb_run_id    with `train.wandb_project`: the W&B run every launch of this run logs to
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import uuid
from typing import Any, Mapping, Sequence

import jax
import ml_collections
from etils import epath

from jaxfm import config as config_lib
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.models import BertConfig
from jaxfm.trees import flatten

CONFIG_FILE = "config.json"
TASK_FILE = "task.json"
TOKENIZER_DIR = "tokenizer"
METRICS_FILE = "metrics.jsonl"
DONE_FILE = "DONE"
WANDB_RUN_ID_FILE = "wandb_run_id"
_VERSIONED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tokenizers")


class WorkdirError(RuntimeError):
  """The workdir is unusable, or holds a run with a different config."""


def absolute(workdir: str) -> epath.Path:
  """`workdir` as an absolute path (Orbax's tensorstore layer refuses relative local paths)."""
  return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def checkpoint_dir(workdir: str) -> epath.Path:
  return absolute(workdir) / "checkpoints"


def best_dir(workdir: str) -> epath.Path:
  return absolute(workdir) / "best"


def compile_cache_dir(workdir: str) -> epath.Path:
  return absolute(workdir) / "compile_cache"


def tensorboard_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "tensorboard"


def metrics_file(workdir: str) -> epath.Path:
  return epath.Path(workdir) / METRICS_FILE


def on_object_store(workdir: str) -> bool:
  """Whether `workdir` is on an object store (gs://, s3://, ...), where files take no appends."""
  return "://" in str(workdir) and not str(workdir).startswith("file://")


def metrics_segment(workdir: str, start_step: int) -> epath.Path:
  """Where the run segment that starts at `start_step` logs its metrics: metrics.jsonl,
  appended to, on a local disk; on an object store, whose append mode overwrites (gcsfs) and
  whose files appear only when closed, a file of its own, `metrics-<start_step>.jsonl`."""
  if not on_object_store(workdir):
    return metrics_file(workdir)
  return epath.Path(workdir) / f"metrics-{start_step:09d}.jsonl"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Every metrics record of a run, segment after segment in the order they logged them (a
  resumed segment's records of a step come after the ones it replaces)."""
  paths = sorted(epath.Path(workdir).glob("metrics-*.jsonl"))
  if metrics_file(workdir).exists():
    paths.insert(0, metrics_file(workdir))
  return [json.loads(line) for path in paths for line in path.read_text().splitlines()
          if line.strip()]


def tokenizer_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / TOKENIZER_DIR


def require_gcs_support(paths: Mapping[str, str]) -> None:
  """Fails at start-up, naming the fix, when a gs:// path of `paths` (what names it -> the path)
  cannot be opened: without TensorFlow, etils epath reaches gs:// through fsspec, which imports
  gcsfs only on the first file access (an ImportError traceback, possibly mid-run).

  Raises:
    WorkdirError: some path is on gs:// and neither gcsfs nor TensorFlow is installed.
  """
  on_gcs = [f"{name}={path}" for name, path in paths.items() if "gs://" in str(path)]
  if on_gcs and not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
    raise WorkdirError(f"{', '.join(on_gcs)}: gs:// paths need gcsfs, which is not installed: "
                       f"pip install 'jaxfm[gcs]'")


def probe_write(directory: epath.Path) -> None:
  """Writes and removes a small file in `directory`; OSError if it takes no writes."""
  probe = directory / f".write-probe-{uuid.uuid4().hex}"
  probe.write_text("ok")
  probe.unlink()


def _write_atomically(path: epath.Path, text: str) -> None:
  """Writes `text` to `path` whole or not at all: through a temporary file and a rename on a
  local disk; directly on an object store, where an object appears only once its upload has
  completed (and a rename is a copy and a delete)."""
  if on_object_store(str(path)):
    path.write_text(text)
    return
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


# ---------------------------------------------------------------- config.json


def _versions() -> dict[str, str]:
  out = {}
  for name in _VERSIONED:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = "absent"
  return out


# Fields a resumed run may change without --allow_config_change: they don't alter the math.
RESUMABLE_CHANGES = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.checkpoint_every", "train.checkpoint_every_seconds", "train.keep_checkpoints",
    "train.profile_steps", "train.eval_at_start",
    "train.keep_every", "train.async_checkpointing", "train.progress_bar", "train.wandb_project",
    "data.worker_count", "model.cpu_paths", "runtime.platform",
    "data.prepared",  # the same examples either way; the loader's fingerprint refuses others
)


def config_changes(saved: dict, current: dict) -> list[str]:
  """Lines `field: saved -> current` for changed fields that a resume must not silently accept."""
  old, new = flatten(saved, "."), flatten(current, ".")
  return [f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}"
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES]


def prepare_workdir(workdir: str, cfg: ml_collections.ConfigDict, allow_config_change: bool) -> None:
  """Creates the workdir, proves it writable, and guards a resume against a changed config."""
  root = epath.Path(workdir)
  try:
    root.mkdir(parents=True, exist_ok=True)
    probe_write(root)
  except OSError as e:
    raise WorkdirError(f"workdir {workdir} is not writable: {e}") from e
  if jax.process_index() == 0:  # this launch trains (again) until it writes the marker anew
    (root / DONE_FILE).unlink(missing_ok=True)
  saved_file = root / CONFIG_FILE
  if saved_file.exists():
    saved = json.loads(saved_file.read_text())["config"]
    saved.get("model", {}).pop("vocab_size", None)  # resolved from the tokenizer at run time
    compare = json.loads(json.dumps(cfg.to_dict()))
    compare.get("model", {}).pop("vocab_size", None)
    changes = config_changes(saved, compare)
    if changes and not allow_config_change:
      raise WorkdirError(f"{workdir} holds a run with a different config; pass "
                         "--allow_config_change to resume anyway, or use a new workdir:\n  "
                         + "\n  ".join(changes))


def write_resolved_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Writes the resolved config and package versions to `workdir/config.json` (process 0)."""
  if jax.process_index() == 0:
    _write_atomically(epath.Path(workdir) / CONFIG_FILE,
                      json.dumps({"config": cfg.to_dict(), "versions": _versions()}, indent=2))


def mark_done(workdir: str, step: int) -> None:
  """Writes the DONE marker (process 0): the run is finished, not stopped by a preemption, so a
  supervisor (`launch/tpu.sh babysit`) need not relaunch it."""
  if jax.process_index() == 0:
    _write_atomically(epath.Path(workdir) / DONE_FILE, f"step {step}\n")


def wandb_run_id(workdir: str) -> str:
  """The W&B run id of this workdir, made and saved by its first launch, so that a relaunch
  after a preemption continues the same W&B run (process 0 only: it alone logs to W&B)."""
  path = epath.Path(workdir) / WANDB_RUN_ID_FILE
  if not path.exists():
    _write_atomically(path, uuid.uuid4().hex[:16] + "\n")
  return path.read_text().strip()


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config a run wrote to its workdir."""
  return ml_collections.ConfigDict(
      json.loads((epath.Path(workdir) / CONFIG_FILE).read_text())["config"])


def read_model_config(workdir: str) -> BertConfig:
  """The architecture recorded in a training workdir.

  Raises:
    WorkdirError: `workdir` holds no config.json.
  """
  if not (epath.Path(workdir) / CONFIG_FILE).exists():
    raise WorkdirError(f"{workdir} is not a jaxfm workdir: "
                       f"{epath.Path(workdir) / CONFIG_FILE} is missing")
  return config_lib.bert_config(read_config(workdir), platform=None)


def existing_tokenizer_dir(workdir: str) -> str | None:
  """The workdir's tokenizer folder, None when it has none."""
  path = tokenizer_dir(workdir)
  return str(path) if path.exists() else None


# ---------------------------------------------------------------- task.json + tokenizer


@dataclasses.dataclass(frozen=True)
class SavedRun:
  """What `evaluate` and `predict` need from a fine-tuning workdir, and nothing else."""

  cfg: ml_collections.ConfigDict
  label_names: list[str] | None
  tokenizer: Any  # jaxfm.data.tokenizer.WordPieceTokenizer


def save_run_files(workdir: str, kind: str, label_names: Sequence[str] | None,
                   tokenizer: Any) -> None:
  """Writes the label vocabulary and tokenizer beside the checkpoints (process 0, atomically)."""
  if jax.process_index() != 0:
    return
  tokenizer.save(tokenizer_dir(workdir))
  _write_atomically(epath.Path(workdir) / TASK_FILE,
                    json.dumps({"task": kind, "label_names": label_names}, indent=2))


def label_names(workdir: str) -> list[str] | None:
  """The label vocabulary a fine-tuning workdir recorded (None if none, or not fine-tuning)."""
  task_file = epath.Path(workdir) / TASK_FILE
  if not task_file.exists():
    return None
  return json.loads(task_file.read_text()).get("label_names")


def load_run(workdir: str) -> SavedRun:
  """Reads a fine-tuning workdir's resolved config, labels and tokenizer."""
  root = epath.Path(workdir)
  for name in (CONFIG_FILE, TASK_FILE, TOKENIZER_DIR):
    if not (root / name).exists():
      raise FileNotFoundError(f"{workdir} is not a jaxfm fine-tuning workdir: {name} is missing")
  return SavedRun(read_config(workdir), label_names(workdir),
                  load_tokenizer(tokenizer_dir(workdir)))
