"""A task model's outputs and hidden states, read from outside the model code.

`nn.intercept_methods` sees every module call of a forward pass, so the task's own loss
function runs unchanged while the root module's output (the logits) and each encoder layer's
output are recorded from the same forward. The layers must be called one by one (not under
`nn.scan` or `nn.remat`, whose inner calls run in another trace): `config.validate_distill`
asks for that when the hidden-state loss is on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator

import flax.linen as nn
import jax

_LAYER = re.compile(r"layer_(\d+)")


@dataclasses.dataclass
class Captured:
  """What one forward pass gave: the root module's output and the hidden states
  {0: embeddings output, i: layer i's output (1-based)}, each [b, t or outputs, d]."""

  output: Any = None
  hidden: dict[int, jax.Array] = dataclasses.field(default_factory=dict)


def _record(found: Captured, path: tuple[str, ...], out: Any) -> None:
  if not path:
    found.output = out
  elif path == ("encoder", "embeddings"):
    found.hidden[0] = out
  elif len(path) == 2 and path[0] == "encoder" and _LAYER.fullmatch(path[1]):
    found.hidden[int(path[1][len("layer_"):]) + 1] = out[0]  # a layer returns (x, None)


@contextlib.contextmanager
def capturing() -> Iterator[Captured]:
  """Records the outputs of the model calls made inside the block (one forward pass)."""
  found = Captured()

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      _record(found, tuple(context.module.path), out)
    return out

  with nn.intercept_methods(interceptor):
    yield found
