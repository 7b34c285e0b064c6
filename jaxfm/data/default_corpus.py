"""The embedded default corpus: English text every Python installation carries.

It is assembled at run time, without network access or extra packages, from

* the docstrings of the public standard-library modules (`sys.stdlib_module_names` and
  their submodules, sorted): module, class, function and method docstrings via
  `inspect.getdoc`, skipping private names, objects re-exported from another module and
  duplicate texts; one document per module;
* the Python language reference topics shipped for `help()` (`pydoc_data.topics`), one
  document per topic.

Each docstring paragraph becomes one segment (its hard-wrapped lines joined by spaces).
On CPython 3.11 this is about 1.6 MB of text in 442 documents and takes about a second.
The modules are imported in a child interpreter (`python -I`), so their import side
effects never reach the caller; modules known to act on import (`antigravity`, `this`,
`tkinter`, `turtle`, `idlelib`, `__main__` submodules, ...) are never imported. The
result is deterministic for a given Python build (it changes with the Python version).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import os
import pkgutil
import subprocess
import sys
import warnings

Document = list[str]

# Never imported: they act on import (browser, printing, GUI, grammar caches, readline
# hooks, running tests) or are huge test suites.
_UNSAFE = frozenset({
    "__main__", "antigravity", "ensurepip", "idlelib", "lib2to3", "pydoc_data", "readline",
    "rlcompleter", "site", "test", "this", "tkinter", "turtle", "turtledemo",
    "encodings",  # hundreds of codec modules with one-line docstrings
})


def _import(name: str):
  """Imports a module silently; None when it fails to import on this platform."""
  try:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
        contextlib.redirect_stderr(io.StringIO()):
      warnings.simplefilter("ignore")
      return importlib.import_module(name)
  except BaseException:  # pylint: disable=broad-except  # SystemExit, platform errors.
    return None


def _module_names() -> list[str]:
  """Public stdlib modules and their public submodules that import here, sorted."""
  names = []
  for top in sorted(sys.stdlib_module_names):
    if top.startswith("_") or top in _UNSAFE or _import(top) is None:
      continue
    names.append(top)
    module = sys.modules[top]
    if not hasattr(module, "__path__"):
      continue
    for info in pkgutil.walk_packages(module.__path__, top + ".", onerror=lambda _: None):
      parts = info.name.split(".")[1:]
      if any(p.startswith("_") or p in _UNSAFE for p in parts):
        continue
      if _import(info.name) is not None:
        names.append(info.name)
  return sorted(names)


def _paragraphs(doc: str) -> list[str]:
  """Splits a docstring at blank lines and joins each paragraph's wrapped lines."""
  return [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]


def _members(module) -> list:
  """The module, then its public classes/functions defined in it, then their methods."""
  objects = [module]
  for name, obj in sorted(vars(module).items()):
    if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
      continue
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
      continue
    objects.append(obj)
    if inspect.isclass(obj):
      for attr, member in sorted(vars(obj).items()):
        if attr.startswith("_"):
          continue
        if isinstance(member, (classmethod, staticmethod)):
          member = member.__func__
        if inspect.isroutine(member) or isinstance(member, property):
          objects.append(member)
  return objects


def _collect() -> list[Document]:
  """Runs in the child interpreter: all documents, in a fixed order."""
  seen: set[str] = set()
  documents = []
  for name in _module_names():
    segments = []
    for obj in _members(sys.modules[name]):
      doc = inspect.getdoc(obj)
      if doc and doc not in seen:
        seen.add(doc)
        segments.extend(_paragraphs(doc))
    if segments:
      documents.append(segments)
  topics = _import("pydoc_data.topics")
  for topic in sorted(topics.topics if topics else {}):
    segments = _paragraphs(topics.topics[topic])
    if segments:
      documents.append(segments)
  return documents


@functools.cache
def default_documents() -> tuple[Document, ...]:
  """The default corpus as documents (lists of paragraph segments); cached per process."""
  result = subprocess.run([sys.executable, "-I", os.path.abspath(__file__)], check=False,
                          capture_output=True, text=True, encoding="utf-8")
  if result.returncode:
    raise RuntimeError(f"building the default corpus failed:\n{result.stderr[-2000:]}")
  return tuple(json.loads(result.stdout))


if __name__ == "__main__":
  sys.stdout.write(json.dumps(_collect(), ensure_ascii=True))
