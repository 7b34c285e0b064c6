"""Convert parameter trees between the unrolled (`layer_i`) and scanned (`layers` + the last
`layer_i`) layouts."""

from __future__ import annotations

from typing import Any

import numpy as np

Params = dict[str, Any]


def _map_encoder(params: Params, fn) -> Params:
  out = dict(params)
  out["encoder"] = fn(dict(params["encoder"]))
  return out


def stack_layers(params: Params) -> Params:
  """`encoder/layer_{i}/...` -> `encoder/layers/...` with a leading layer axis, for every layer
  but the last, which stays `encoder/layer_{L-1}` (as `BertEncoder` scans them)."""
  def stack(encoder: Params) -> Params:
    names = sorted((k for k in encoder if k.startswith("layer_")), key=lambda k: int(k[6:]))
    if len(names) < 2:
      return encoder
    layers = [encoder.pop(k) for k in names[:-1]]
    encoder["layers"] = _tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *layers)
    return encoder
  return _map_encoder(params, stack)


def unstack_layers(params: Params) -> Params:
  """`encoder/layers/...` (stacked: the bottom layers) -> `encoder/layer_{i}/...`."""
  def unstack(encoder: Params) -> Params:
    if "layers" not in encoder:
      return encoder
    stacked = encoder.pop("layers")
    depth = len(next(iter(_leaves(stacked))))
    for i in range(depth):
      encoder[f"layer_{i}"] = _tree_map(lambda x, i=i: np.asarray(x)[i], stacked)
    return encoder
  return _map_encoder(params, unstack)


def _tree_map(fn, *trees):
  first = trees[0]
  if isinstance(first, dict):
    return {k: _tree_map(fn, *(t[k] for t in trees)) for k in first}
  return fn(*trees)


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree
