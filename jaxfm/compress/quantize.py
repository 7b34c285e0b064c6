"""Post-training int8 quantization of a fine-tuned encoder: weight-only and w8a8.

**Storage (both modes).** Every matmul kernel and embedding table is held as int8 with one
float32 scale per output channel (`qwix.quantize`, symmetric: step absmax / 127 over
[-127, 127]); biases and LayerNorm stay float32. A kernel `x[..., in] . kernel[in..., out...]`
gets a scale per `out` entry, a table one per row (a lookup reads whole rows).

**Compute.**
- `weight_only`: the int8 weights are dequantized inside the jitted step and the unchanged
  model runs in its compute dtype. Memory, not arithmetic, is what shrinks.
- `w8a8`: qwix intercepts the model's `dot_general`s (no model edits): each matmul quantizes
  its activations per token (dynamic, the same symmetric scheme) and its weight per output
  channel, and multiplies int8 by int8 into int32. Attention scores and context (activation
  by activation) stay float, as under PyTorch's dynamic quantization of `nn.Linear`. The
  weight qwix quantizes is the dequantized stored one, which requantizes to the stored int8
  values and scales (`tests/test_quantize.py`): the step multiplies by the saved checkpoint.

**Why qwix, and its QT provider.** google/qwix intercepts `jax.lax.dot_general` wherever a
Flax linen module calls it, so the attention's hand-written projections (`jnp.tensordot`) are
quantized like `nn.Dense`. google/aqt's linen interception swaps `lax.dot_general` under
`nn.Dense` methods only: it misses the attention's QKV and output projections (a third of each
layer's weights); more means passing `AqtDotGeneral` into model code. Neither quantizes a
table lookup, so the tables are this module's own (`qwix.quantize` on the param tree). qwix's
PTQ provider, which takes weights pre-quantized in the param tree, cannot take the fused QKV
kernel: the attention slices and transposes it before the matmul (differently in the last
layer, whose queries are the output positions only), and the PTQ tree records it in that
transformed shape. The QT provider quantizes whatever reaches the matmul: the slice of the
dequantized kernel. `benchmarks/quantize.py` measures both libraries.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxfm.compress import MODES

try:
  import qwix
except ImportError as e:
  raise ImportError("int8 quantization needs qwix: pip install 'jaxfm[quant]'") from e

QArray = qwix.QArray

# How many leading axes each of the encoder's matmul kernels contracts (`x[..., in] .
# kernel[in..., out...]`, as `models.encoder.contract` and `nn.Dense` use them). Under the
# scanned layout (`encoder/layers/...`) a leading layer axis comes first: it keeps its scales.
_CONTRACTED = {"kernel": 1, "qkv_kernel": 1, "out_kernel": 2}
_TABLES = ("embedding",)  # [rows, features]
# qwix's plain "absmax" maps the largest magnitude to 127.5 (the top buckets saturate at 127 and
# -128). Widening the bound by 127.5/127 gives the symmetric step absmax / 127 over [-127, 127]:
# the dequantized values' largest magnitude is then 127 steps, so quantizing them again (what
# w8a8 does to the weights) gives back the same int8 values and scales.
CALIBRATION = f"absmax,{127.5 / 127}"


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ValueError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
  return mode


def _channel_axes(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
  """The axes that keep their own scale (None: the parameter stays float)."""
  layer_axis = 1 if "layers" in path else 0
  name = path[-1]
  if name in _CONTRACTED:
    return tuple(range(layer_axis)) + tuple(range(layer_axis + _CONTRACTED[name], len(shape)))
  if name in _TABLES:
    return (0,)
  return None


def _path(key_path: tuple[Any, ...]) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in key_path)


@jax.jit
def quantize_params(params: Any) -> Any:
  """`params` with each matmul kernel and embedding table as an int8 `QArray` (float32 scales
  per output channel or table row); the other leaves as they were.

  Always compiled: XLA's arithmetic for the scales differs from op-by-op execution in the last
  bit, which rounds a few weights to the neighbouring int8 value. Compiled alike, the export
  holds the values quantization-aware training's steps computed with (`fake_quantize`).
  """
  def quantize(key_path: tuple[Any, ...], value: Any) -> Any:
    axes = _channel_axes(_path(key_path), np.shape(value))
    if axes is None:
      return value
    return qwix.quantize(jnp.asarray(value, jnp.float32), jnp.int8, channelwise_axes=axes,
                         calibration_method=CALIBRATION)
  return jax.tree_util.tree_map_with_path(quantize, nn.meta.unbox(params))


def is_quantized(leaf: Any) -> bool:
  return isinstance(leaf, QArray)


def dequantize_params(params: Any) -> Any:
  """The float32 tree the model takes: each `QArray` as int8 x scale (works under jit)."""
  return jax.tree.map(lambda x: qwix.dequantize(x) if is_quantized(x) else x, params,
                      is_leaf=is_quantized)


def fake_quantize(params: Any) -> Any:
  """`params` as their int8 export holds them (`dequantize_params(quantize_params(params))`)
  in the forward pass, and the identity in the backward pass (straight-through), so that
  quantization-aware training moves the float params the int8 values are rounded from."""
  rounded = jax.lax.stop_gradient(dequantize_params(quantize_params(params)))
  # q + (p - p): exactly q forward, d/dp = 1 backward.
  return jax.tree.map(lambda p, q: q + (p - jax.lax.stop_gradient(p)), nn.meta.unbox(params),
                      rounded)


def compute_model(model: nn.Module, mode: str) -> nn.Module:
  """The model that runs the dequantized params: unchanged for `weight_only`; for `w8a8`,
  with qwix quantizing each matmul's operands to int8 (activations per token, weights per
  output channel) and multiplying them in int8. Differentiable (qwix's QT provider: the
  backward pass is straight-through, in float), so quantization-aware training runs it too.

  `model` is a jaxfm task model (a `config: BertConfig` field). For `w8a8` its CPU paths are
  off: their GEMMs go through `jnp.matmul`, whose `dot_general` qwix does not reach; they
  change only how the backward pass is scheduled, not what it computes.
  """
  if check_mode(mode) == "weight_only":
    return model
  rule = qwix.QtRule(module_path=".*", op_names=("dot_general",), weight_qtype=jnp.int8,
                     act_qtype=jnp.int8, weight_calibration_method=CALIBRATION,
                     act_calibration_method=CALIBRATION)
  plain = model.clone(config=model.config.replace(cpu_paths=False))
  return qwix.quantize_model(plain, qwix.QtProvider([rule]))


def nbytes(params: Any) -> int:
  """Bytes of every array of `params` (int8 values and their scales included)."""
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))
