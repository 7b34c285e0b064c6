"""A task model's outputs, hidden states and attention inputs, read from outside the model.

`nn.intercept_methods` sees every module call of a forward pass, so the task's own loss
function runs unchanged while the root module's output (the logits), each encoder layer's
output and each self-attention's input and QKV params are recorded from the same forward. The
layers must be called one by one (not under `nn.scan` or `nn.remat`, whose inner calls run in
another trace): `config.validate_distill` asks for that when a loss reads inside the encoder.

Queries, keys and values are recomputed from the attention's input at every position, so a
last layer that runs its queries at [CLS] only (a classifier) still gives the whole
attention distribution (MiniLM).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp

_LAYER = re.compile(r"layer_(\d+)")


@dataclasses.dataclass(frozen=True)
class AttentionInput:
  """One self-attention call: its input x [b, t, d] and fused QKV params, kernel
  [d, 3, heads, head_dim] and bias [3, heads, head_dim] (as `models.encoder.SelfAttention`)."""

  x: jax.Array
  kernel: jax.Array
  bias: jax.Array

  def qkv(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values at every position, each [b, t, heads, head_dim] float32."""
    out = jnp.einsum("btd,dpnh->btpnh", self.x.astype(jnp.float32),
                     self.kernel.astype(jnp.float32)) + self.bias.astype(jnp.float32)
    return out[:, :, 0], out[:, :, 1], out[:, :, 2]


@dataclasses.dataclass
class Captured:
  """What one forward pass gave: the root module's output, the hidden states
  {0: embeddings output, i: layer i's output (1-based)}, each [b, t or outputs, d], and the
  self-attention inputs {i: layer i's (1-based)}."""

  output: Any = None
  hidden: dict[int, jax.Array] = dataclasses.field(default_factory=dict)
  attention: dict[int, AttentionInput] = dataclasses.field(default_factory=dict)


def _layer_number(name: str) -> int | None:
  """'layer_i' -> i + 1 (hidden-state numbering); None for any other name."""
  match = _LAYER.fullmatch(name)
  return None if match is None else int(match[1]) + 1


def _record(found: Captured, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
  path = tuple(module.path)
  if not path:
    found.output = out
  elif path == ("encoder", "embeddings"):
    found.hidden[0] = out
  elif len(path) >= 2 and path[0] == "encoder" and (layer := _layer_number(path[1])):
    if len(path) == 2:
      found.hidden[layer] = out[0]  # a layer returns (x, None)
    elif path[2:] == ("attention",):  # args: (x, mask, deterministic, ...)
      found.attention[layer] = AttentionInput(args[0],
                                              module.get_variable("params", "qkv_kernel"),
                                              module.get_variable("params", "qkv_bias"))


@contextlib.contextmanager
def capturing() -> Iterator[Captured]:
  """Records the outputs of the model calls made inside the block (one forward pass)."""
  found = Captured()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      _record(found, context.module, args, out)
    return out

  with nn.intercept_methods(interceptor):
    yield found
