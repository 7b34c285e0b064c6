"""The student's architecture and starting params (`distill.student_init`).

- `every_k` (DistilBERT): the teacher's architecture with `model.num_layers` layers; student
  layer i starts as teacher layer (i+1)k-1 (k = teacher layers / student layers), with that
  layer's heads if the teacher was pruned, so the top layer under the pooler and head stays the
  teacher's top layer; the embeddings, pooler and head are the teacher's.
- `random`: the config's size fields, with the teacher's vocabulary, positions and token types.
- `init_from`: the checkpoint's architecture and params (as fine-tuning's `init_from`).
"""

from __future__ import annotations

import re
from typing import Any

import ml_collections
from absl import logging

from jaxfm import config as config_lib
from jaxfm import weights
from jaxfm.distillation.teacher import Teacher
from jaxfm.trees import flatten, unflatten

_LAYER_PARAM = re.compile(r"encoder/layer_(\d+)/(.*)")
_FROM_TEACHER_WHEN_RANDOM = ("vocab_size", "max_position_embeddings", "type_vocab_size")


def take_architecture(cfg: ml_collections.ConfigDict, teacher: Teacher) -> Any:
  """Fills the student's architecture into `cfg.model`; returns the params to start from
  (host arrays, any layout; None for a random student).

  Raises:
    ConfigError: the student cannot be built from the teacher (layers, vocabulary).
  """
  init = cfg.distill.student_init
  if init == "every_k":
    layers = cfg.model.num_layers
    if layers <= 0 or teacher.config.num_layers % layers:
      config_lib.fail("model.num_layers", layers, f"must divide the teacher's "
                      f"{teacher.config.num_layers} layers (distill.student_init=every_k)")
    k = teacher.config.num_layers // layers
    kept = [(i + 1) * k - 1 for i in range(layers)]
    pruned = teacher.config.pruned_heads
    config_lib.take_architecture(cfg, teacher.config.replace(
        num_layers=layers, pruned_heads=tuple(pruned[i] for i in kept) if pruned else ()))
    logging.info("student: every %d-th teacher layer (%s)", k, kept)
    return every_k_layers(teacher.params, k, layers)
  if init == "random":
    # The size fields stay the config's, so the student has every head.
    config_lib.take_architecture(cfg, teacher.config.replace(pruned_heads=()),
                                 _FROM_TEACHER_WHEN_RANDOM)
    return None
  source = weights.read_pretrained(cfg.init_from, "auto")
  if source.config.vocab_size != teacher.config.vocab_size:
    config_lib.fail("init_from", cfg.init_from, f"has vocab_size={source.config.vocab_size}, "
                    f"the teacher {teacher.config.vocab_size}: they must share the tokenizer")
  config_lib.take_architecture(cfg, source.config)
  return source.params


def every_k_layers(teacher_params: Any, k: int, student_layers: int) -> Any:
  """The student's params from an unscanned teacher tree: layer i <- teacher layer (i+1)k-1,
  every other param (embeddings, pooler, head) by name."""
  student = {}
  for name, value in flatten(teacher_params).items():
    match = _LAYER_PARAM.fullmatch(name)
    if match is None:
      student[name] = value
    elif (int(match[1]) + 1) % k == 0 and (int(match[1]) + 1) // k <= student_layers:
      student[f"encoder/layer_{(int(match[1]) + 1) // k - 1}/{match[2]}"] = value
  return unflatten(student)
