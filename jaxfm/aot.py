r"""Will it fit: compiles the real train and eval steps for a Cloud TPU slice, on a CPU machine.

  python -m jaxfm.aot --config=configs/pretrain/bert_base.py --topology=v5e:2x4 \
      [--config.train.batch_size=512] [--json]
  python -m jaxfm.aot --config=configs/finetune/sst2.py --topology=v5e:2x4 --architecture=base \
      [--config.data.length_buckets=32,64,96] [--num_labels=2]

Needs libtpu (the `[tpu]` extra, or `make aot-check`) but no TPU: the devices are compile-only
ones from `jax.experimental.topologies.get_topology_desc`. Prints per-device memory against the
chip's HBM, FITS / DOES NOT FIT, the compiled and model FLOPs, and the step time and tokens/s
implied at 50% MFU. A fine-tuning config (one with a `task`) is compiled at each of its
`data.length_buckets` lengths, as many shapes as the run compiles, one report each. Exit
status: 0 everything fits, 1 something does not fit, 2 a bad flag or config.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from jaxfm import config as config_lib
from jaxfm import sharding
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.finetuning.run import (quantization_aware, resolve_length_buckets, resolve_schedule,
                                  split_path)
from jaxfm.tasks import TASKS, load_split, make_task, mlm_task
from jaxfm.train import flops, loop

GiB = 2**30
MFU = 0.5

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining or fine-tuning config file.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "Cloud TPU slice, e.g. v5e:2x4, v4:2x2x2.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON line per compiled length instead of "
                          "the table.")
_ARCHITECTURE = flags.DEFINE_string(
    "architecture", "", "Fine-tuning configs: a size preset (jaxfm.models.PRESETS, e.g. base) "
    "whose architecture replaces the config's, as the init_from checkpoint's does in a run; "
    "'' keeps the config's.")
_NUM_LABELS = flags.DEFINE_integer("num_labels", 2, "Fine-tuning configs: the head's labels "
                                   "(classification) or tags (ner).")
flags.mark_flags_as_required(["config", "topology"])


class AotError(ValueError):
  """A flag or config the check cannot use; the message names it."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation as the check sees it (Cloud TPU docs; one JAX device per chip).

  Attributes:
    hbm_bytes: HBM per chip.
    host_chips: chips per host (x, y, z) of the VM type that multi-host slices use.
    single_host_chips: the most chips a slice served by one VM has (v5e/v6e: up to 8 chips on
      one VM; their larger slices use 4-chip VMs).
    chip_config: libtpu's chip config; "megacore" fuses a chip's two TensorCores.
  """

  hbm_bytes: int
  host_chips: tuple[int, int, int]
  single_host_chips: int = 4
  chip_config: str = "default"


CHIPS = {
    "v4": Chip(32 * GiB, (2, 2, 1), chip_config="megacore"),
    "v5e": Chip(16 * GiB, (2, 2, 1), single_host_chips=8),
    "v5p": Chip(95 * GiB, (2, 2, 1), chip_config="megacore"),
    "v6e": Chip(32 * GiB, (2, 2, 1), single_host_chips=8),
}


def parse_topology(name: str) -> tuple[Chip, tuple[int, int, int]]:
  """'v5e:2x4' -> (the v5e Chip, (2, 4, 1)); AotError naming --topology otherwise."""
  match = re.fullmatch(r"(v\w+?):(\d+(?:x\d+){1,2})", name)
  if not match:
    raise AotError(f"--topology={name!r}: expected GENERATION:AxB[xC], e.g. v5e:2x4 or v4:2x2x2")
  kind, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
  if kind not in CHIPS:
    raise AotError(f"--topology={name!r}: unknown TPU generation {kind!r}; "
                   f"choose one of {', '.join(CHIPS)}")
  if 0 in dims:
    raise AotError(f"--topology={name!r}: every dimension must be >= 1")
  return CHIPS[kind], (*dims, 1)[:3]


def tpu_devices(name: str) -> tuple[list[jax.Device], Chip]:
  """Compile-only devices of the slice `name` (needs libtpu, not a TPU)."""
  chip, dims = parse_topology(name)
  # libtpu's lockfile keeps a second process off the chips; compile-only devices open none, and
  # without this a check fails while another one (or a test process) has libtpu loaded.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if importlib.util.find_spec("libtpu") is None and "TPU_LIBRARY_PATH" not in os.environ:
    raise AotError("--topology needs libtpu, which is not installed: pip install -e '.[tpu]' "
                   "(or run `make aot-check`)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  one_host = math.prod(dims) <= chip.single_host_chips
  try:
    desc = topologies.get_topology_desc(
        topology_name=name, platform="tpu", chip_config_name=chip.chip_config,
        chips_per_host_bounds=dims if one_host else chip.host_chips)
  except jax.errors.JaxRuntimeError as e:
    raise AotError(f"--topology={name!r}: libtpu rejects it: {e}") from e
  return list(desc.devices), chip


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Per-device bytes from XLA's memory analysis of one compiled step."""

  arguments: int
  outputs: int
  aliased: int  # outputs written into donated arguments: counted once
  temporaries: int
  generated_code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.generated_code


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """One compiled step; `memory` is None when XLA ran out of device memory compiling it."""

  memory: StepMemory | None
  flops_per_device: float | None  # XLA's cost analysis; a scan's body is counted once
  compile_s: float
  error: str = ""


@dataclasses.dataclass(frozen=True)
class Report:
  """What the check found for one config on one set of devices."""

  device_kind: str
  devices: int
  hosts: int
  mesh: dict[str, int]
  batch_size: int
  seq_len: int
  params: int
  hbm_bytes: int
  scan_layers: bool
  train: CompiledStep
  eval: CompiledStep
  model_flops_per_step: float
  peak_flops: float | None
  length_buckets: tuple[int, ...] = ()  # a fine-tuning run's compiled lengths
  padding_share: float | None = None  # tokens computed per real token, when planned from data

  @property
  def peak_bytes(self) -> int | None:
    """The larger of the train step and the eval step with the optimizer state still resident."""
    train, evaluation = self.train.memory, self.eval.memory
    if train is None or evaluation is None:
      return None
    return max(train.total, evaluation.total + train.arguments - evaluation.arguments)

  @property
  def fits(self) -> bool:
    return self.peak_bytes is not None and self.peak_bytes <= self.hbm_bytes

  @property
  def step_s(self) -> float | None:
    """Step time at `MFU` of the chips' peak, from the model FLOPs (`jaxfm.train.flops`)."""
    if not self.peak_flops:
      return None
    return self.model_flops_per_step / (MFU * self.peak_flops * self.devices)

  @property
  def tokens_per_s(self) -> float | None:
    step_s = self.step_s
    return None if step_s is None else self.batch_size * self.seq_len / step_s

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for step in ("train", "eval"):
      memory = getattr(self, step).memory
      if memory is not None:
        out[step]["memory"]["total"] = memory.total
    out.update(peak_bytes=self.peak_bytes, fits=self.fits, mfu=MFU, step_s=self.step_s,
               tokens_per_s=self.tokens_per_s)
    return out


def resolve_vocab(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose model.vocab_size is data.vocab_size when a pretraining run would train its
  tokenizer (a fine-tuning run's vocabulary is its architecture's)."""
  cfg = cfg.copy_and_resolve_references()
  if "task" not in cfg and not cfg.data.tokenizer:
    cfg.model.vocab_size = cfg.data.vocab_size
  return cfg


def _mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> jax.sharding.Mesh:
  shape = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
  try:
    mesh = loop.make_mesh(cfg, devices)
  except ValueError as e:
    raise AotError(f"mesh.data/fsdp/tensor={shape} does not match the {len(devices)} devices of "
                   f"the topology ({e}); change --config.mesh.* or --topology") from e
  try:
    sharding.local_batch_size(cfg.train.batch_size, mesh)
  except ValueError as e:
    raise AotError(f"train.batch_size={cfg.train.batch_size} {e}") from e
  return mesh


def _compile(step: Any, *args: Any) -> CompiledStep:
  start = time.perf_counter()
  try:
    compiled = step.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return CompiledStep(None, None, time.perf_counter() - start, str(e).strip().splitlines()[0])
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  memory = StepMemory(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
                      aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
                      generated_code=stats.generated_code_size_in_bytes)
  return CompiledStep(memory, float(compiled.cost_analysis().get("flops", 0.0)), seconds)


def _task(cfg: ml_collections.ConfigDict, platform: str, num_labels: int) -> loop.Task:
  """The run's task: MLM for a pretraining config, else the fine-tuning kind with `num_labels`
  placeholder labels (QA and regression heads have none)."""
  model = config_lib.bert_config(cfg, platform)
  if "task" not in cfg:
    return mlm_task(model, cfg.data.max_seq_length, cfg.data.max_predictions_per_seq)
  if cfg.task not in TASKS:
    raise AotError(f"task={cfg.task!r}: choose one of {', '.join(TASKS)}")
  labels = [f"L{i}" for i in range(num_labels)] if cfg.task in ("classification", "ner") else None
  return quantization_aware(cfg, make_task(cfg.task, model, labels, None, cfg.data))


def with_architecture(cfg: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """A copy of `cfg` whose architecture fields are preset `name`'s (dtype, dropout, scan, remat
  and the CPU paths stay as configured), as a fine-tuning run takes its init_from's."""
  cfg = cfg.copy_and_resolve_references()
  try:
    preset = config_lib.model_config(name)
  except (KeyError, ValueError) as e:
    raise AotError(f"--architecture={name!r}: {e}") from e
  with cfg.unlocked():
    for field in config_lib.ARCHITECTURE_FIELDS:
      cfg.model[field] = preset[field]
  return cfg


def compiled_lengths(cfg: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The sequence lengths a run of `cfg` compiles: a fine-tuning config's buckets, else
  `max_seq_length`. `auto` is chosen from the training file as the run chooses it when the
  config names that file and `data.tokenizer` (`plan_length_buckets`); else it stays open and
  only `max_seq_length` is compiled."""
  if "task" in cfg and cfg.data.length_buckets != "auto":
    return config_lib.length_buckets(cfg.data)
  return (cfg.data.max_seq_length,)


def plan_length_buckets(cfg: ml_collections.ConfigDict, platform: str
                        ) -> ml_collections.ConfigDict:
  """`cfg`, or a copy whose `data.length_buckets=auto` holds the lengths a fine-tuning run on
  `platform` devices would choose from its training file (and `data.padding_share` what they
  give): the run's shapes planned for the slice before it starts. Needs `data.tokenizer` with
  the file (the vocabulary of the checkpoint the run would start from)."""
  if "task" not in cfg or cfg.data.length_buckets != "auto" or not split_path(cfg.data, "train"):
    return cfg
  if not cfg.data.tokenizer:
    raise AotError("data.length_buckets=auto with a training file needs data.tokenizer "
                   "(the vocab of the checkpoint the run starts from) to plan the buckets")
  cfg = cfg.copy_and_resolve_references()
  tokenizer = load_tokenizer(cfg.data.tokenizer, lowercase=cfg.data.lowercase)
  train, _ = load_split(cfg.task, cfg.data, split_path(cfg.data, "train"), tokenizer.backend,
                        None, cfg.data.max_train_examples)
  resolve_schedule(cfg, len(train), None)
  resolve_length_buckets(cfg, train, platform)
  return cfg


def check(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device], hbm_bytes: int,
          num_labels: int = 2) -> list[Report]:
  """Compiles `cfg`'s train and eval steps over `devices` (any platform) against `hbm_bytes`,
  one report per length in `compiled_lengths`."""
  cfg = resolve_vocab(plan_length_buckets(cfg, devices[0].platform))
  if "task" in cfg:  # the data fields are not needed: the batch is abstract
    # A run resolves its cadence from the data; it does not change what is compiled.
    cfg.train.eval_every = cfg.train.eval_every or 1
    cfg.train.checkpoint_every = cfg.train.checkpoint_every or cfg.train.eval_every
    for validate in (config_lib.validate_model, config_lib.validate_mesh,
                     config_lib.validate_optim, config_lib.validate_train,
                     config_lib.validate_sequence_length):
      validate(cfg)
  else:
    config_lib.validate(cfg)
  mesh = _mesh(cfg, devices)
  reports = []
  lengths = compiled_lengths(cfg)
  for seq_len in lengths:
    at_length = cfg.copy_and_resolve_references()
    at_length.data.max_seq_length = seq_len
    task = _task(at_length, devices[0].platform, num_labels)
    steps = loop.build_steps(at_length, task, mesh)
    batch = steps.abstract_batch(task, cfg.train.batch_size)
    with sharding.activation_sharding(mesh):
      train = _compile(steps.train_step, steps.abstract_state, batch)
      evaluation = _compile(steps.eval_step, steps.abstract_state.params, batch)
    reports.append(Report(
        device_kind=devices[0].device_kind, devices=len(devices),
        hosts=len({d.process_index for d in devices}), mesh=dict(mesh.shape),
        batch_size=cfg.train.batch_size, seq_len=seq_len,
        params=sum(math.prod(p.shape) for p in jax.tree.leaves(steps.abstract_state.params)),
        hbm_bytes=hbm_bytes, scan_layers=cfg.model.scan_layers, train=train, eval=evaluation,
        model_flops_per_step=task.flops_per_token(seq_len) * cfg.train.batch_size * seq_len,
        peak_flops=flops.peak_flops_per_device(devices[0].device_kind),
        length_buckets=lengths if "task" in cfg else (),
        padding_share=cfg.data.get("padding_share") or None))  # 0.0: not planned from data
  return reports


def _size(n: int | None) -> str:
  if n is None:
    return "n/a"
  return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def format_report(report: Report, title: str) -> str:
  """The human-readable table."""
  r = report
  lines = [title,
           f"{r.devices} x {r.device_kind}, {r.hosts} host(s), mesh {r.mesh}; "
           f"batch {r.batch_size} x seq {r.seq_len}, {r.params / 1e6:.1f}M params",
           *([f"length buckets {','.join(map(str, r.length_buckets))} (one compiled shape each)"
              + (f": {r.padding_share:.3f} tokens computed per real token in the training data"
                 if r.padding_share is not None else "")] if r.length_buckets else []),
           f"{'per-device memory':<20}{'train step':>14}{'eval step':>14}"]
  rows = ("arguments", "outputs", "aliased", "temporaries", "generated_code", "total")
  for row in rows:
    cells = [_size(getattr(s.memory, row)) if s.memory else "OOM" for s in (r.train, r.eval)]
    lines.append(f"  {row.replace('_', ' '):<18}{cells[0]:>14}{cells[1]:>14}")
  for name, step in (("train", r.train), ("eval", r.eval)):
    if step.error:
      lines.append(f"  {name} step did not compile: {step.error}")
  verdict = "FITS" if r.fits else "DOES NOT FIT"
  share = f" ({r.peak_bytes / r.hbm_bytes:.0%} of HBM)" if r.peak_bytes is not None else ""
  lines.append(f"peak {_size(r.peak_bytes)} of {_size(r.hbm_bytes)} HBM per chip{share}: {verdict}")
  if r.train.flops_per_device is not None:
    lines.append(f"compiled FLOPs per train step: {r.train.flops_per_device:.3e} per device, "
                 f"{r.train.flops_per_device * r.devices:.3e} in all"
                 + (" (XLA counts the scanned layer stack once: model.scan_layers=True)"
                    if r.scan_layers else ""))
  lines.append(f"model FLOPs per train step: {r.model_flops_per_step:.3e} (jaxfm.train.flops)")
  if r.step_s is not None:
    lines.append(f"at {MFU:.0%} MFU ({r.peak_flops / 1e12:.0f} TFLOP/s per chip): "
                 f"{r.step_s * 1e3:.3g} ms per step, {r.tokens_per_s:,.0f} tokens/s")
  lines.append(f"compile: train {r.train.compile_s:.1f} s, eval {r.eval.compile_s:.1f} s")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")  # the host needs no accelerator for this
  cfg = _CONFIG.value
  try:
    if _ARCHITECTURE.value:
      cfg = with_architecture(cfg, _ARCHITECTURE.value)
    devices, chip = tpu_devices(_TOPOLOGY.value)
    reports = check(cfg, devices, chip.hbm_bytes, _NUM_LABELS.value)
  except (AotError, config_lib.ConfigError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  config_file = config_flags.get_config_filename(flags.FLAGS["config"])
  for report in reports:
    if _JSON.value:
      print(json.dumps({"config": config_file, "topology": _TOPOLOGY.value, **report.to_json()}))
    else:
      print(format_report(report, f"{config_file} on {_TOPOLOGY.value}"))
  sys.exit(0 if all(r.fits for r in reports) else 1)


if __name__ == "__main__":
  app.run(main)
