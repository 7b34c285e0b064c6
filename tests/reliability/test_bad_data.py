"""6. Bad input: each line lands in exactly one counter; unreadable input is an error at file:line.

The expected fate of each line comes from a small oracle over the raw bytes, so the
readers' counters are checked one by one, not only in sum.
"""

from __future__ import annotations

import collections
import gzip
import re
from pathlib import Path

import pytest

from jaxfm.data.corpus import CorpusCounters, CorpusError, CorpusSpec, read_documents

HUGE_LINE_BYTES = 10 * 1024 * 1024
FILES = {
    "empty.txt": b"",
    "empty_too.txt.gz": b"",
    "whitespace.txt": b"  \n\t\t\n \x0b \nreal text\n   ",
    "bad_utf8.txt": b"fine\n\xff\xfe broken \xc3\n\nalso fine\n\xed\xa0\x80 surrogate\n",
    "nul.txt": b"a\x00b\n\x00\x00\x00\nafter nul\n",
    "bom.txt": b"\xef\xbb\xbffirst after bom\nsecond\n",
    "bom_only.txt": b"\xef\xbb\xbf\nnext\n",
    "crlf.txt": b"one\r\ntwo\r\n\r\nthree\r\n",
    "no_final_newline.txt": b"last line has no newline",
    "huge.txt": (b"lorem ipsum " * (HUGE_LINE_BYTES // 12 + 1))[:HUGE_LINE_BYTES] + b"\nshort\n",
    "zipped.txt.gz": b"zipped\r\n\n\xffbad\n",
}


def _lines(data: bytes) -> list[bytes]:
  """The raw lines of a file: split at b'\\n', the last one may lack it."""
  lines = data.split(b"\n")
  return lines[:-1] if lines[-1] == b"" else lines


def _fate(raw: bytes, first: bool, policy: str) -> str:
  """What the readers must do with one raw line: the line-fate counter it belongs to."""
  raw = raw.removesuffix(b"\r").replace(b"\x00", b"")
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError:
    return f"decode_errors_{'skipped' if policy == 'skip' else 'replaced'}"
  if first:
    text = text.removeprefix("\ufeff")
  return "text_lines" if text.strip() else "blank_lines"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  root = tmp_path_factory.mktemp("bad_data")
  for name, data in FILES.items():
    (root / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
  return root


def _read(spec: CorpusSpec) -> tuple[list[list[str]], CorpusCounters]:
  counters = CorpusCounters()
  return list(read_documents(spec, counters)), counters


@pytest.mark.parametrize("policy", ["skip", "replace"])
@pytest.mark.parametrize("documents", ["blank_line", "line"])
def test_every_line_lands_in_exactly_one_counter(corpus, policy, documents):
  docs, counters = _read(CorpusSpec(train_files=f"{corpus}/*.txt,{corpus}/*.gz",
                                    on_decode_error=policy, documents=documents))
  expected = collections.Counter(_fate(raw, i == 0, policy)
                                 for data in FILES.values() for i, raw in enumerate(_lines(data)))
  got = {fate: getattr(counters, fate) for fate in CorpusCounters.LINE_FATES}
  assert got == {fate: expected.get(fate, 0) for fate in CorpusCounters.LINE_FATES}
  assert counters.lines_total() == sum(len(_lines(d)) for d in FILES.values())
  assert counters.files == len(FILES) and counters.documents == len(docs)
  assert counters.boms_removed == 2 and counters.nul_bytes_removed == 4
  assert counters.long_lines_split == 1
  segments = [s for d in docs for s in d]
  assert all(s and s == s.strip() and not set(s) & {"\x00", "\ufeff", "\r"} for s in segments)
  assert {"first after bom", "last line has no newline", "a" + "b", "short"} <= set(segments)
  print(f"{policy}/{documents}: {counters.lines_total()} lines accounted for: {got}")


def test_invalid_utf8_is_an_error_naming_file_and_line(corpus):
  with pytest.raises(CorpusError, match=rf"{corpus}/bad_utf8\.txt:2: invalid UTF-8"):
    _read(CorpusSpec(train_files=f"{corpus}/bad_utf8.txt"))


def test_truncated_gzip_is_an_error_naming_file_and_line(tmp_path):
  data = gzip.compress(b"".join(b"line %d of the corpus\n" % i for i in range(5000)))
  (tmp_path / "cut.txt.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(CorpusError, match=rf"{tmp_path}/cut\.txt\.gz:\d+ onwards is lost") as e:
    _read(CorpusSpec(train_files=str(tmp_path / "cut.txt.gz")))
  assert 0 < int(re.search(r"cut\.txt\.gz:(\d+)", str(e.value))[1]) < 5000


def test_glob_with_no_match_is_an_error_naming_it(corpus):
  with pytest.raises(CorpusError, match=r"'[^']*/nothing-\*\.txt' matches no file"):
    _read(CorpusSpec(train_files=f"{corpus}/empty.txt,{corpus}/nothing-*.txt"))
