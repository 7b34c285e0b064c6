"""Nested dicts <-> flat dicts keyed by joined paths (parameter names, dotted config fields)."""

from __future__ import annotations

from typing import Any, Mapping


def flatten(tree: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} (with `sep`)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, sep, f"{prefix}{key}{sep}"))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = "/") -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}} (with `sep`)."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split(sep)
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree
