"""Corpus readers: text or JSONL files (local or `gs://`, `.gz` too), tfds, or the default.

A document is a list of segments (non-empty lines, or paragraphs), read in a fixed order.
Every input line is accounted for in exactly one "line fate" counter of `CorpusCounters`,
so `counters.lines_total()` equals the number of lines read; the counters serialise to a
dict for logging and checkpointing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO, ClassVar

import ml_collections
from etils import epath

from jaxfm.data.default_corpus import default_documents

Document = list[str]  # the non-empty segments of one document, in order
MAX_SEGMENT_CHARS = 10_000  # longer lines are split (at whitespace) for parallel tokenising
_GLOB_CHARS = frozenset("*?[")
_BOM = "\ufeff"
_SPACES = re.compile(r"\s*")


class CorpusError(ValueError):
  """Unreadable or unusable corpus input; the message names the file (and line)."""


@dataclasses.dataclass
class CorpusCounters:
  """What happened to the input. Each line lands in exactly one of `LINE_FATES`.

  A tfds record counts as one line, and so does a paragraph of the default corpus.
  """
  LINE_FATES: ClassVar[tuple[str, ...]] = (
      "text_lines", "blank_lines", "decode_errors_skipped", "decode_errors_replaced",
      "bad_records_skipped", "empty_records")
  text_lines: int = 0  # contributed text to a document
  blank_lines: int = 0  # empty or whitespace-only (document separators in blank_line mode)
  decode_errors_skipped: int = 0  # invalid UTF-8, dropped (on_decode_error=skip)
  decode_errors_replaced: int = 0  # invalid UTF-8 kept with U+FFFD (on_decode_error=replace)
  bad_records_skipped: int = 0  # JSONL lines that are not an object with a string text field
  empty_records: int = 0  # JSONL/tfds records whose text is blank
  # Other statistics (not line fates).
  files: int = 0
  documents: int = 0
  nul_bytes_removed: int = 0
  boms_removed: int = 0
  long_lines_split: int = 0  # lines longer than MAX_SEGMENT_CHARS, split into segments
  documents_of_other_shards: int = 0  # read (so counted above), left to the hosts that own them

  def count(self, fate: str) -> None:
    setattr(self, fate, getattr(self, fate) + 1)

  def lines_total(self) -> int:
    return sum(getattr(self, name) for name in self.LINE_FATES)

  def as_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """Where the corpus lives and how to read it (mirrors `cfg.data`)."""
  train_files: str = ""  # comma-separated globs; '' = the embedded default corpus
  format: str = "text"  # text | jsonl | tfds
  text_field: str = "text"
  documents: str = "blank_line"  # blank_line | line
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tfds_split: str = "train"
  on_decode_error: str = "error"  # error | skip | replace

  @classmethod
  def from_config(cls, data_cfg: ml_collections.ConfigDict) -> CorpusSpec:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data_cfg.items() if k in names})


def split_long(text: str, counters: CorpusCounters) -> list[str]:
  """Splits `text` into pieces of at most MAX_SEGMENT_CHARS, at whitespace where possible.

  Linear in len(text): a 10 MB line costs what its copy costs.
  """
  if len(text) <= MAX_SEGMENT_CHARS:
    return [text]
  counters.long_lines_split += 1
  pieces, start = [], 0
  while len(text) - start > MAX_SEGMENT_CHARS:
    cut = text.rfind(" ", start + MAX_SEGMENT_CHARS // 2, start + MAX_SEGMENT_CHARS)
    end = cut if cut > start else start + MAX_SEGMENT_CHARS
    pieces.append(text[start:end])
    start = _SPACES.match(text, end).end()
  return pieces + ([text[start:]] if start < len(text) else [])


def _segments(text: str, counters: CorpusCounters) -> Document:
  """The non-blank lines of a multi-line text (JSONL/tfds records), long ones split."""
  return [piece for line in text.splitlines() if line.strip()
          for piece in split_long(line.strip(), counters)]


def expand_globs(patterns: str) -> list[epath.Path]:
  """Files matching comma-separated globs, sorted per glob, without duplicates.

  Raises:
    CorpusError: when a glob (or plain path) matches no file.
  """
  files: dict[str, epath.Path] = {}
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    parts = pattern.split("/")
    first = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), None)
    if first is None:
      matches = [epath.Path(pattern)] if epath.Path(pattern).is_file() else []
    else:
      base = epath.Path("/".join(parts[:first]) or ".")
      rest = "/".join(parts[first:])
      found = base.glob(rest) if base.exists() else []
      matches = sorted((p for p in found if p.is_file()), key=str)
    if not matches:
      raise CorpusError(f"data.train_files: {pattern!r} matches no file")
    files.update((str(p), p) for p in matches)
  return list(files.values())


@contextlib.contextmanager
def _open(path: epath.Path) -> Iterator[BinaryIO]:
  with path.open("rb") as raw:
    if path.name.endswith(".gz"):
      with gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
        yield unzipped
    else:
      yield raw


def _decode(raw: bytes, path: epath.Path, lineno: int, policy: str) -> tuple[str | None, str]:
  """(text or None if skipped, line fate for a non-blank line)."""
  try:
    return raw.decode("utf-8"), "text_lines"
  except UnicodeDecodeError as e:
    if policy == "skip":
      return None, "decode_errors_skipped"
    if policy == "replace":
      return raw.decode("utf-8", errors="replace"), "decode_errors_replaced"
    raise CorpusError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line; set "
                      "data.on_decode_error=skip or replace to tolerate it") from e


def _lines(path: epath.Path, spec: CorpusSpec,
           counters: CorpusCounters) -> Iterator[tuple[int, str | None, str]]:
  """(line number, text or None, fate) per line; NUL bytes, BOM and CR removed."""
  lineno = 0
  try:
    with _open(path) as f:
      for lineno, raw in enumerate(f, 1):
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        if b"\x00" in raw:
          counters.nul_bytes_removed += raw.count(b"\x00")
          raw = raw.replace(b"\x00", b"")
        text, fate = _decode(raw, path, lineno, spec.on_decode_error)
        if lineno == 1 and text and text.startswith(_BOM):
          counters.boms_removed += 1
          text = text[1:]
        if text is not None and not text.strip():
          text, fate = None, "blank_lines"
        yield lineno, text, fate
  except (EOFError, gzip.BadGzipFile, zlib.error) as e:
    raise CorpusError(f"{path}: truncated or corrupt gzip data after line {lineno}: "
                      f"{path}:{lineno + 1} onwards is lost ({e})") from e


def _text_documents(path: epath.Path, spec: CorpusSpec,
                    counters: CorpusCounters) -> Iterator[Document]:
  doc: Document = []
  for _, text, fate in _lines(path, spec, counters):
    counters.count(fate)
    if fate == "blank_lines" and spec.documents == "blank_line" and doc:
      yield doc
      doc = []
    if text is None:
      continue
    doc.extend(split_long(text.strip(), counters))
    if spec.documents == "line":
      yield doc
      doc = []
  if doc:
    yield doc


def _jsonl_record(where: str, line: str, spec: CorpusSpec) -> str | None:
  """The text field of one JSONL line; None when malformed and the policy tolerates it."""
  try:
    text = json.loads(line)[spec.text_field]
    if not isinstance(text, str):
      raise TypeError(f"field {spec.text_field!r} is {type(text).__name__}, not a string")
    return text
  except (ValueError, KeyError, TypeError, IndexError) as e:
    if spec.on_decode_error == "error":
      raise CorpusError(f"{where}: not a JSON object with a string field {spec.text_field!r} "
                        f"({e!r}); set data.on_decode_error=skip to drop such records") from e
    return None


def _jsonl_documents(path: epath.Path, spec: CorpusSpec,
                     counters: CorpusCounters) -> Iterator[Document]:
  for lineno, line, fate in _lines(path, spec, counters):
    doc: Document = []
    if line is not None:
      text = _jsonl_record(f"{path}:{lineno}", line, spec)
      if text is None:
        fate = "bad_records_skipped"
      else:
        doc = _segments(text, counters)
        fate = fate if doc else "empty_records"
    counters.count(fate)
    if doc:
      yield doc


def _tfds_documents(spec: CorpusSpec, counters: CorpusCounters,
                    records: Callable[[int], Iterable[int]] = range) -> Iterator[Document]:
  """Records of `tfds.data_source` (ArrayRecord; no TensorFlow needed).

  Reads the records `records(len(source))` (all by default) in that order.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # heavy, optional

  try:
    source = tfds.data_source(spec.tfds_name, split=spec.tfds_split,
                              data_dir=spec.tfds_data_dir or None)
  except Exception as e:  # tfds raises many types for a missing/unprepared dataset
    raise CorpusError(
        f"data.tfds_name={spec.tfds_name!r}: cannot open split {spec.tfds_split!r} in "
        f"data_dir={spec.tfds_data_dir or '(tfds default)'}: {type(e).__name__}: "
        f"{(str(e).splitlines() or [''])[0]} Prepare it first, e.g. "
        f"`tfds build {spec.tfds_name} --file_format=array_record "
        f"--data_dir={spec.tfds_data_dir or '...'}`") from e
  counters.files += 1
  for i in records(len(source)):
    text = source[i][spec.text_field]
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
    doc = _segments(text, counters)
    counters.count("text_lines" if doc else "empty_records")
    if doc:
      counters.documents += 1
      yield doc


def read_documents(spec: CorpusSpec, counters: CorpusCounters) -> Iterator[Document]:
  """All documents of the corpus in a fixed order, updating `counters` as it goes."""
  if spec.format == "tfds":
    yield from _tfds_documents(spec, counters)
    return
  if not spec.train_files:
    for doc in default_documents():
      counters.text_lines += len(doc)
      counters.documents += 1
      yield list(doc)
    return
  for path in expand_globs(spec.train_files):
    yield from _file_documents(path, spec, counters)


def _file_documents(path: epath.Path, spec: CorpusSpec,
                    counters: CorpusCounters) -> Iterator[Document]:
  if spec.format not in ("text", "jsonl"):
    raise CorpusError(f"data.format={spec.format!r} must be text, jsonl or tfds")
  reader = _jsonl_documents if spec.format == "jsonl" else _text_documents
  counters.files += 1
  for doc in reader(path, spec, counters):
    counters.documents += 1
    yield doc


def read_shards(spec: CorpusSpec, counters: CorpusCounters, num_shards: int,
                shards: Sequence[int]) -> dict[int, list[Document]]:
  """The documents of `shards` (of `num_shards` disjoint shards), each shard in corpus order.

  With at least `num_shards` files, shard v is files v, v + S, ... and a host opens only the
  files of its shards; a tfds corpus gives shard v its records v, v + S, ... and reads only
  those. Otherwise (fewer files, or the default corpus) shard v is documents v, v + S, ... of
  the whole corpus: every host reads it all but keeps (tokenises, packs) only its shards'.
  """
  out: dict[int, list[Document]] = {v: [] for v in shards}
  if not all(0 <= v < num_shards for v in out):
    raise ValueError(f"shards {sorted(out)} out of range for data.num_shards={num_shards}")
  if spec.format == "tfds":
    for v in out:
      out[v].extend(_tfds_documents(spec, counters, lambda n, v=v: range(v, n, num_shards)))
    return out
  files = expand_globs(spec.train_files) if spec.train_files else []
  if len(files) >= num_shards > 1:
    for k, path in enumerate(files):
      if k % num_shards in out:
        out[k % num_shards].extend(_file_documents(path, spec, counters))
    return out
  for i, doc in enumerate(read_documents(spec, counters)):
    if i % num_shards in out:
      out[i % num_shards].append(doc)
    else:
      counters.documents_of_other_shards += 1
  return out
