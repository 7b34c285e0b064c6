"""Fine-tuning task data: readers and feature converters for classification, NER and QA.

Readers never drop a bad input row silently: by default they raise an error naming where the
row is (`file:line`, or the question id); with `on_error="skip"` they skip it, count it and
log the count. Converters take a `tokenizers`-style tokenizer (`Tokenizer.from_file(...)` or
`BertWordPieceTokenizer(vocab.txt)`) that must not truncate or pad on its own, and return
dicts of fixed-shape numpy arrays.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from absl import logging

ON_ERROR = ("raise", "skip")


class RowError(ValueError):
  """A bad input row; `where` (e.g. `file:line`) overrides the location the reader gives it."""

  def __init__(self, message: str, where: str | None = None):
    super().__init__(message)
    self.where = where


class RowPolicy:
  """Turns bad rows into errors naming where they are, or (on_error="skip") counts them.

  Usage: `with policy.at(f"{path}:{line}"): examples.append(parse(line))`, then
  `policy.done()`.
  """

  def __init__(self, source: str, on_error: str = "raise"):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    self.source = source
    self.on_error = on_error
    self.skipped: list[str] = []

  @contextlib.contextmanager
  def at(self, where: str) -> Iterator[None]:
    """Runs the parsing of one row; a RowError inside is re-raised with its location, or counted."""
    try:
      yield
    except RowError as error:
      message = f"{error.where or where}: {error}"
      if self.on_error == "raise":
        raise RowError(message) from None
      self.skipped.append(message)

  def done(self) -> None:
    """Logs how many rows were skipped, with the first reason."""
    if self.skipped:
      logging.warning("%s: skipped %d bad rows (on_error='skip'); the first: %s",
                      self.source, len(self.skipped), self.skipped[0])


def token_ids(tokenizer: Any, *tokens: str) -> list[int]:
  """Ids of special tokens; checks that the tokenizer neither truncates nor pads by itself."""
  if getattr(tokenizer, "truncation", None) or getattr(tokenizer, "padding", None):
    raise ValueError("the tokenizer truncates or pads by itself (its tokenizer.json says so); "
                     "call tokenizer.no_truncation() and tokenizer.no_padding() first")
  ids = [tokenizer.token_to_id(token) for token in tokens]
  if None in ids:
    raise ValueError(f"the tokenizer's vocabulary lacks one of {tokens}")
  return ids
