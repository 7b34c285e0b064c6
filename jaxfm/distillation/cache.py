"""The teacher's top-k logits on the training set, on disk (`distill.teacher_cache`).

For a teacher too expensive to run in every step: one pass of the frozen teacher over the
training features (each part's rows sorted by length into length-bucketed batches) writes
`part-<start>-<end>.npz` files of `chunk` features each, every one renamed into place once
complete, so a pass cut short resumes at the first missing part and a complete cache is read,
never recomputed. Each feature keeps the
teacher's k largest logits per target with their class indices (every logit, in class order,
when the head has no more than k), which `losses.top_k_kl` reads. A QA head's targets are its
start and end distributions over the positions: k positions each, a padding position among them
(a window shorter than k) kept as [CLS] with a logit no softmax picks, so that every index lies
inside the window whatever length bucket a training batch is cut to.

`cache.json`, written before any part, records what the cache was made from: the teacher's
params (sha256), int8 mode ('' for float: the same int8 values compute otherwise in w8a8) and
dtype, the training features (their count and crc32), the task and k. A cache made otherwise
is refused, naming the field that differs.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from jaxfm import config as config_lib
from jaxfm import runtime, sharding
from jaxfm.data import loader
from jaxfm.distillation import capture, losses
from jaxfm.distillation.teacher import Teacher
from jaxfm.tasks.base import INPUTS
from jaxfm.train import loop

VALUES, INDICES = "teacher_values", "teacher_indices"  # the batch fields a cached run adds
CHUNK = 4096  # features per part file
_MANIFEST = "cache.json"


def top_k(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """[..., classes] -> the k largest logits and their indices, [..., min(k, classes)]: all of
  them in class order when classes <= k."""
  classes = logits.shape[-1]
  if classes <= k:
    return logits, jnp.broadcast_to(jnp.arange(classes, dtype=jnp.int32), logits.shape)
  return jax.lax.top_k(logits, k)


def _made_from(cfg: ml_collections.ConfigDict, teacher: Teacher,
               features: dict[str, np.ndarray]) -> dict[str, Any]:
  """What a cache for this run must have been made from (the manifest's fields)."""
  inputs = b"".join(np.ascontiguousarray(features[name]).tobytes() for name in INPUTS)
  return {"teacher_sha256": teacher.sha256, "teacher_int8": teacher.int8_mode,
          "teacher_dtype": cfg.distill.teacher_dtype, "task": cfg.task,
          "top_k": cfg.distill.teacher_top_k,
          "num_examples": int(len(features["input_ids"])),
          "examples_crc32": zlib.crc32(inputs), "chunk": CHUNK}


# The config field that names what each manifest entry depends on.
_FIELDS = {"teacher_sha256": "teacher", "teacher_int8": "teacher",
           "teacher_dtype": "distill.teacher_dtype",
           "task": "task", "top_k": "distill.teacher_top_k",
           "num_examples": "data.train_file", "examples_crc32": "data.train_file"}


# What a manifest written before a field existed means by its absence: a float teacher.
_BEFORE = {"teacher_int8": ""}


def _check(cfg: ml_collections.ConfigDict, directory: epath.Path,
           expected: dict[str, Any]) -> dict[str, Any]:
  """The manifest of `directory`, written now if absent; ConfigError naming the field whose
  value made the cache otherwise."""
  path = directory / _MANIFEST
  if not path.exists():
    directory.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
      path.write_text(json.dumps(expected, indent=1))
    return expected
  found = {**_BEFORE, **json.loads(path.read_text())}
  for key, field in _FIELDS.items():
    if found.get(key) != expected[key]:
      config_lib.fail(field, _value(cfg, field), f"differs from what distill.teacher_cache="
                      f"{str(directory)!r} was made from ({key} {found.get(key)!r}, this run "
                      f"{expected[key]!r}): name another directory")
  return found


def _value(cfg: ml_collections.ConfigDict, dotted: str) -> Any:
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def _part(directory: epath.Path, start: int, end: int) -> epath.Path:
  return directory / f"part-{start:09d}-{end:09d}.npz"


def _teacher_pass(cfg: ml_collections.ConfigDict, teacher: Teacher, teacher_task: loop.Task
                  ) -> Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
  """features (one chunk, host arrays) -> (values, indices) [n, 1 / t / 2 (QA), k], the
  teacher's params sharded on the run's mesh by their logical axes, `train.batch_size` rows a
  step."""
  mesh = loop.make_mesh(cfg)
  abstract = jax.eval_shape(teacher_task.init_params, jax.random.key(0))
  shardings = sharding.unbox(sharding.logical_shardings(abstract, mesh))
  dtype = jnp.dtype(cfg.distill.teacher_dtype)
  params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), teacher.params),
                          shardings)
  k = cfg.distill.teacher_top_k

  def step(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    with capture.capturing() as found:
      teacher_task.predict_fn(params, batch)
    logits = losses.head_logits(found.output, batch["attention_mask"]).astype(jnp.float32)
    if isinstance(found.output, tuple):  # QA: [b, 2, t] over the positions
      return _span_top_k(logits, cfg.data.max_seq_length, k)
    values, indices = top_k(logits if logits.ndim == 3 else logits[:, None], k)
    return values, indices  # [b, 1 or t, k]
  replicated = NamedSharding(mesh, PartitionSpec())
  run = jax.jit(step, out_shardings=(replicated, replicated))
  size, per_host = cfg.train.batch_size, runtime.per_host_batch_size(cfg)
  mine = slice(jax.process_index() * per_host, (jax.process_index() + 1) * per_host)
  buckets = ((cfg.data.max_seq_length,) if cfg.data.length_buckets == "auto"  # not yet chosen
             else config_lib.length_buckets(cfg.data))

  def chunk(features: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    # A pass has no order to keep: rows sorted by length fill batches that are cut to the
    # shortest length bucket holding them (one compile per bucket), then go back in place.
    n, full = features["input_ids"].shape
    lengths = features["attention_mask"].sum(axis=1)  # [n]
    order = np.argsort(lengths, kind="stable")
    out = []
    with sharding.activation_sharding(mesh):
      for start in range(0, n, size):
        rows = order[np.minimum(np.arange(start, start + size), n - 1)]  # the last repeats one
        batch = loader.cut_to_bucket(
            {name: features[name][rows] for name in (*INPUTS, "feature_index", "weights")},
            int(lengths[rows].max()), buckets)
        local = {name: value[mine] for name, value in batch.items()}
        values, indices = jax.device_get(run(params, sharding.global_batch(local, mesh)))
        out.append(_to_full_length(values, indices, batch["input_ids"].shape[1], full))
    in_order = []
    for part in zip(*out):
      sorted_rows = np.concatenate(part)[:n]
      placed = np.empty_like(sorted_rows)
      placed[order] = sorted_rows
      in_order.append(placed)
    return in_order[0], in_order[1]
  return chunk


def _span_top_k(logits: jax.Array, full: int, k: int) -> tuple[jax.Array, jax.Array]:
  """A QA batch's [b, 2, length] masked position logits -> the k largest of each span end over
  `full` positions, [b, 2, min(k, full)], padding positions as [CLS] with the masked logit."""
  padded = jnp.pad(logits, ((0, 0), (0, 0), (0, full - logits.shape[-1])),
                   constant_values=losses.MASKED)
  values, indices = top_k(padded, k)
  padding = values <= losses.MASKED
  return values, jnp.where(padding, 0, indices)


def _to_full_length(values: np.ndarray, indices: np.ndarray, length: int, full: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """A cut batch's per-token outputs ([b, length, k]) padded with zeros to `full` tokens, as
  the training batches hold them (zero-weight positions); per-row outputs ([b, 1, k]) as are."""
  if values.shape[1] != length or length == full:
    return values, indices
  pad = ((0, 0), (0, full - length), (0, 0))
  return np.pad(values, pad), np.pad(indices, pad)


def teacher_outputs(cfg: ml_collections.ConfigDict, teacher: Teacher, teacher_task: loop.Task,
                    features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{VALUES: [n, 1 / t / 2 (QA), k] float32, INDICES: int32} of the training `features`, read from
  `distill.teacher_cache`, computing and writing the parts it lacks.

  Raises:
    ConfigError: the directory holds a cache made from another teacher, training set or k.
  """
  directory = epath.Path(cfg.distill.teacher_cache)
  made = _check(cfg, directory, _made_from(cfg, teacher, features))
  n, step = made["num_examples"], made["chunk"]
  run = None
  values, indices, computed = [], [], 0
  for start in range(0, n, step):
    end = min(start + step, n)
    path = _part(directory, start, end)
    if path.exists():
      with path.open("rb") as f, np.load(f) as part:
        v, i = part["values"], part["indices"]
    else:
      run = run or _teacher_pass(cfg, teacher, teacher_task)
      v, i = run({name: array[start:end] for name, array in features.items()})
      if jax.process_index() == 0:
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as f:
          np.savez(f, values=v, indices=i)
        tmp.rename(path)
      computed += end - start
    values.append(v)
    indices.append(i)
  logging.info("teacher cache %s: %d of %d features computed now, the rest read", directory,
               computed, n)
  return {VALUES: np.concatenate(values).astype(np.float32),
          INDICES: np.concatenate(indices).astype(np.int32)}
