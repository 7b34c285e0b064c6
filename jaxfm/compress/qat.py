"""Quantization-aware fine-tuning (`quantize.qat`): the task's loss and predictions run the
model as its int8 export runs it (Q8BERT's recipe, with the export's own rules).

Each call rounds the float params to what `jaxfm.quantize` will store (`quantize.fake_quantize`:
int8 per output channel or table row, then dequantized) and runs them through
`quantize.compute_model` of the same mode (for `w8a8` qwix's QT provider also rounds each
matmul's activations per token). The backward pass is straight-through, so the optimizer keeps
float params whose int8 export computes what training's forward pass computed: the eval step
scores the int8 model, and `evaluate` of the exported folder gives the same metrics up to
w8a8's own noise (two compiled programs may differ in an activation's last bit, which can move
it to the neighbouring int8 step; weight-only matches to float rounding).
"""

from __future__ import annotations

import dataclasses

from jaxfm.compress import inference, quantize
from jaxfm.train import loop


def qat_task(task: loop.Task, kind: str, mode: str) -> loop.Task:
  """`task` (the float task `tasks.make_task` built) whose loss and predictions take float
  params and compute as their int8 export in `mode` does; the train step stays as it is."""
  int8 = inference.int8_task(task, kind, mode)
  loss_fn, predict_fn = int8.loss_fn, int8.predict_fn
  return dataclasses.replace(
      int8, loss_fn=lambda params, batch, rng: loss_fn(quantize.fake_quantize(params), batch, rng),
      predict_fn=lambda params, batch: predict_fn(quantize.fake_quantize(params), batch))
