r"""Post-training int8 of a fine-tuned classifier: dev accuracy, size and CPU eval time of jaxfm
float32, int8 weight-only and int8 w8a8, beside transformers' PyTorch model of the same
weights in float32 and under `torch.ao.quantization.quantize_dynamic` (int8 `nn.Linear`).

  python -m benchmarks.quantize --workdir=runs/results-sst2 --out=runs/quantize-bench \
      [--repeats=3] [--aqt]
  JAX_PLATFORMS=cpu .venv-tpu/bin/python -m benchmarks.quantize --workdir=runs/results-sst2 \
      --out=runs/quantize-bench --tpu_topology=v5e:1x1 [--batch_size=256] [--dtype=bfloat16]

Every row scores the same features in the same batches (the run's eval batches, at its
`train.batch_size` and length buckets) with the same scorer. `--out` receives the int8 folders
(`python -m jaxfm.quantize`) and the HF export (`python -m jaxfm.convert --to_hf`), made when
absent. Eval time: one pass over the split after a warm-up pass (compiles excluded), the median
of `--repeats`, rows interleaved. `--aqt` adds google/aqt's linen interception (int8 dynamic
w8a8 on `nn.Dense`, which is all it reaches) as the library comparison.

With `--tpu_topology` nothing runs: the eval step of each jaxfm row is compiled for that TPU slice
(libtpu, no TPU) and XLA's per-device memory and cost analysis are printed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
from absl import app, flags

from jaxfm import config as config_lib
from jaxfm import compress, sharding, weights
from jaxfm import workdir as workdir_lib
from jaxfm.compress import inference, int8_dir, quantize
from jaxfm.finetuning import run
from jaxfm.interop import hf
from jaxfm.tasks import TaskSplit, load_split, make_task
from jaxfm.train import loop
from jaxfm.train.step import make_eval_step

_WORKDIR = flags.DEFINE_string("workdir", None, "A fine-tuned classification workdir.")
_OUT = flags.DEFINE_string("out", None, "Folder for the int8 folders and the HF export.")
_SPLIT = flags.DEFINE_enum("split", "dev", ["train", "dev", "test"], "The split to score.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed passes per row.")
_AQT = flags.DEFINE_bool("aqt", False, "Add the google/aqt row.")
_TOPOLOGY = flags.DEFINE_string("tpu_topology", "",
                                "Compile for this TPU slice instead, e.g. v5e:1x1.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "--tpu_topology: global eval batch (0: the run's).")
_DTYPE = flags.DEFINE_string("dtype", "", "--tpu_topology: compute dtype ('': the run's).")
flags.mark_flags_as_required(["workdir", "out"])

Rows = dict[str, Callable[[], dict[str, Any]]]  # name -> one pass: {"accuracy", ...}


def _int8_folder(mode: str) -> str:
  path = os.path.join(_OUT.value, f"int8-{mode}")
  if not compress.is_int8_dir(path):
    int8_dir.write(_WORKDIR.value, path, mode)
  return path


def _hf_folder() -> str:
  path = os.path.join(_OUT.value, "hf")
  if not os.path.isdir(path):
    config, params, tokenizer_dir, _ = weights.load_jaxfm(_WORKDIR.value)
    hf.export_hf(params, config, path, tokenizer_dir, workdir_lib.label_names(_WORKDIR.value))
  return path


def _jaxfm_pass(job: run.Inference) -> Callable[[], dict[str, Any]]:
  def one_pass() -> dict[str, Any]:
    with sharding.activation_sharding(job.mesh):
      return loop.evaluate(job.task, job.steps, job.params, job.batches(), job.mesh)
  return one_pass


def _int8_job(path: str, split: TaskSplit) -> run.Inference:
  """What `finetuning.run.inference` gives for an int8 folder (see the report's integration)."""
  saved = workdir_lib.load_run(path)
  task = make_task(saved.cfg.task, config_lib.bert_config(saved.cfg, jax.devices()[0].platform),
                   saved.label_names, split, saved.cfg.data)
  mesh = loop.make_mesh(saved.cfg)
  ready = compress.int8_inference(path, saved.cfg, task, mesh)
  return run.Inference(saved, split, ready.task, ready.steps, mesh, ready.params, ready.source)


def _aqt_job(job: run.Inference) -> run.Inference:
  """`job` under google/aqt's linen interception (int8 w8a8, dynamic, on every `nn.Dense`),
  with the CPU paths off, which pass their own `dot_general` and so escape it."""
  from aqt.jax.v2 import config as aqt_config  # pylint: disable=g-import-not-at-top
  from aqt.jax.v2.flax.intercept import aqt_intercept_methods  # pylint: disable=g-import-not-at-top
  saved = job.run
  config = config_lib.bert_config(saved.cfg, "cpu").replace(cpu_paths=False)
  task = make_task(saved.cfg.task, config, saved.label_names, job.split, saved.cfg.data)
  float_step = make_eval_step(task.loss_fn, task.predict_fn)
  int8 = aqt_config.fully_quantized(fwd_bits=8, bwd_bits=8)

  def step(params: Any, batch: Any) -> Any:
    with aqt_intercept_methods.intercept_methods(int8, prng_name=None):
      return float_step(params, batch)
  eval_step = jax.jit(step, in_shardings=(job.steps.state_shardings.params,
                                          job.steps.batch_sharding))
  return dataclasses.replace(job, task=task,
                             steps=dataclasses.replace(job.steps, eval_step=eval_step))


def _torch_rows(hf_dir: str, batches: Callable[[], Iterator[dict[str, np.ndarray]]]) -> Rows:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
  int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)

  def one_pass(net: torch.nn.Module) -> dict[str, Any]:
    correct = total = 0.0
    with torch.inference_mode():
      for b in batches():
        logits = net(input_ids=torch.from_numpy(b["input_ids"]).long(),
                     token_type_ids=torch.from_numpy(b["token_type_ids"]).long(),
                     attention_mask=torch.from_numpy(b["attention_mask"]).long()).logits
        hit = (logits.argmax(-1).numpy() == b["labels"]) * b["weights"]
        correct, total = correct + float(hit.sum()), total + float(b["weights"].sum())
    return {"accuracy": correct / total}
  return {"torch float32": lambda: one_pass(model),
          "torch dynamic int8": lambda: one_pass(int8)}


def _torch_bytes(hf_dir: str) -> dict[str, int]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.BertForSequenceClassification.from_pretrained(hf_dir).eval()
  int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
  sizes = {}
  for name, net in (("torch float32", model), ("torch dynamic int8", int8)):
    path = os.path.join(_OUT.value, "state_dict.pt")
    torch.save(net.state_dict(), path)
    sizes[name] = os.path.getsize(path)
    os.remove(path)
  return sizes


def measure() -> list[dict[str, Any]]:
  saved = workdir_lib.load_run(_WORKDIR.value)
  path = getattr(saved.cfg.data, f"{_SPLIT.value}_file")
  split, _ = load_split(saved.cfg.task, saved.cfg.data, path, saved.tokenizer.backend,
                        saved.label_names)
  float_job = run.inference(_WORKDIR.value, saved, split)
  jobs = {"jaxfm float32": float_job}
  folders = {mode: _int8_folder(mode) for mode in compress.MODES}
  jobs.update({f"jaxfm int8 {mode}": _int8_job(folders[mode], split) for mode in compress.MODES})
  if _AQT.value:
    jobs["aqt int8 w8a8 (nn.Dense only)"] = _aqt_job(float_job)
  rows: Rows = {name: _jaxfm_pass(job) for name, job in jobs.items()}
  hf_dir = _hf_folder()
  rows.update(_torch_rows(hf_dir, float_job.batches))
  bytes_ = {name: _params_bytes(job.params) for name, job in jobs.items()}
  bytes_.update({f"jaxfm int8 {mode}": os.path.getsize(os.path.join(folders[mode],
                                                                    int8_dir.PARAMS_FILE))
                 for mode in compress.MODES})
  bytes_.update(_torch_bytes(hf_dir))
  results = {name: one_pass() for name, one_pass in rows.items()}  # warm-up: compiles, scores
  seconds: dict[str, list[float]] = {name: [] for name in rows}
  for _ in range(_REPEATS.value):
    for name, one_pass in rows.items():
      start = time.perf_counter()
      one_pass()
      seconds[name].append(time.perf_counter() - start)
  return [{"row": name, "accuracy": float(results[name]["accuracy"]), "bytes": bytes_[name],
           "eval_s": statistics.median(seconds[name]), "examples": len(split.examples),
           "cpu_threads": os.cpu_count()} for name in rows]


def _params_bytes(params: Any) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))


def compile_for_tpu() -> list[dict[str, Any]]:
  """Each jaxfm row's eval step compiled for `--tpu_topology`: XLA's per-device bytes and cost."""
  from jaxfm import aot  # pylint: disable=g-import-not-at-top
  devices, _ = aot.tpu_devices(_TOPOLOGY.value)
  saved = workdir_lib.load_run(_WORKDIR.value)
  cfg: ml_collections.ConfigDict = saved.cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.train.batch_size = _BATCH.value or cfg.train.batch_size
    cfg.model.dtype = _DTYPE.value or cfg.model.dtype
  task = make_task(cfg.task, config_lib.bert_config(cfg, "tpu"), saved.label_names, None, cfg.data)
  mesh = loop.make_mesh(cfg, devices)
  reports = []
  for mode in ("float32",) + compress.MODES:
    row_task = task if mode == "float32" else inference.int8_task(task, cfg.task, mode)
    steps = loop.build_steps(cfg, row_task, mesh)
    params = steps.abstract_state.params
    step = steps.eval_step
    if mode != "float32":
      int8 = jax.eval_shape(quantize.quantize_params, params)
      shardings = inference.int8_shardings(steps, int8)
      params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            int8, shardings)
      step = inference.with_int8_eval_step(steps, shardings).eval_step
    batch = steps.abstract_batch(row_task, cfg.train.batch_size)
    with sharding.activation_sharding(mesh):
      compiled = step.lower(params, batch).compile()
    memory, cost = compiled.memory_analysis(), compiled.cost_analysis()
    reports.append({
        "row": "jaxfm float32 params" if mode == "float32" else f"jaxfm int8 {mode}",
        "topology": _TOPOLOGY.value, "batch": cfg.train.batch_size,
        "seq": cfg.data.max_seq_length, "dtype": cfg.model.dtype,
        "argument_bytes": memory.argument_size_in_bytes, "temp_bytes": memory.temp_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "flops": cost.get("flops"), "bytes_accessed": cost.get("bytes accessed")})
  return reports


def main(argv: list[str]) -> None:
  del argv
  rows = compile_for_tpu() if _TOPOLOGY.value else measure()
  for row in rows:
    print(json.dumps(row))


if __name__ == "__main__":
  app.run(main)
