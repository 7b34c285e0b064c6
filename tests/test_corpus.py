"""Corpus readers: formats, bad input, line accounting, default corpus."""

import gzip
import json

import pytest

from jaxfm.data.corpus import (MAX_SEGMENT_CHARS, CorpusCounters, CorpusError, CorpusSpec,
                               read_documents)
from jaxfm.data.default_corpus import default_documents


def _line_count(data: bytes) -> int:
  return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def _read(spec: CorpusSpec) -> tuple[list[list[str]], CorpusCounters]:
  counters = CorpusCounters()
  return list(read_documents(spec, counters)), counters


def _write(path, data: bytes) -> int:
  path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
  return _line_count(data)


@pytest.fixture
def messy(tmp_path):
  """Text files with every awkward case; returns (glob, total lines)."""
  files = {
      "a_empty.txt": b"",
      "b_bom_crlf.txt": b"\xef\xbb\xbfFirst line\r\nsecond line\r\n\r\nnext doc\r\n",
      "c_blank_ws.txt": b"   \n\t\n  doc one  \n \n\n\ndoc two\nno final newline",
      "d_nul.txt": b"nul\x00here\n\x00\x00\nafter\n",
      "e_bad_utf8.txt": b"good line\nbad \xff\xfe line\nmore good\n\nlast doc\n",
      "f_huge.txt": b"word " * (3 * MAX_SEGMENT_CHARS // 5 + 7),
      "g_zipped.txt.gz": b"zipped one\nzipped two\n\nzipped doc\n",
  }
  total = sum(_write(tmp_path / name, data) for name, data in files.items())
  return str(tmp_path / "*.txt*"), total


@pytest.mark.parametrize("policy", ["skip", "replace"])
def test_every_line_lands_in_exactly_one_counter(messy, policy):
  pattern, total = messy
  docs, counters = _read(CorpusSpec(train_files=pattern, on_decode_error=policy))
  assert counters.lines_total() == total
  assert counters.files == 7
  assert counters.documents == len(docs)
  assert counters.boms_removed == 1 and counters.nul_bytes_removed == 3
  assert counters.long_lines_split == 1
  assert counters.as_dict()[f"decode_errors_{'skipped' if policy == 'skip' else 'replaced'}"] == 1
  text = "\n".join(s for d in docs for s in d)
  assert "\ufeff" not in text and "\r" not in text and "\x00" not in text
  assert docs[0] == ["First line", "second line"] and docs[1] == ["next doc"]
  assert ["doc two", "no final newline"] in docs
  assert ["nulhere"] in docs and ["after"] in docs  # a NUL-only line is blank: a separator
  assert ["zipped one", "zipped two"] in docs
  assert all(len(s) <= MAX_SEGMENT_CHARS and s.strip() == s and s for d in docs for s in d)
  assert ("bad \ufffd\ufffd line" in text) == (policy == "replace")


def test_invalid_utf8_fails_by_default_naming_file_and_line(messy):
  with pytest.raises(CorpusError, match=r"e_bad_utf8\.txt:2: invalid UTF-8"):
    _read(CorpusSpec(train_files=messy[0]))


def test_line_documents(tmp_path):
  total = _write(tmp_path / "x.txt", b"one\n\ntwo three\n  \nfour")
  docs, counters = _read(CorpusSpec(train_files=str(tmp_path / "x.txt"), documents="line"))
  assert docs == [["one"], ["two three"], ["four"]]
  assert counters.lines_total() == total and counters.blank_lines == 2


def test_jsonl(tmp_path):
  lines = [json.dumps({"text": "alpha beta\n\ngamma", "id": 1}), "", json.dumps({"text": " "}),
           "{not json", json.dumps({"other": "x"}), json.dumps({"text": 3}), json.dumps([1]),
           json.dumps({"text": "delta"})]
  total = _write(tmp_path / "d.jsonl.gz", "\n".join(lines).encode())
  spec = CorpusSpec(train_files=str(tmp_path / "*.jsonl.gz"), format="jsonl",
                    on_decode_error="skip")
  docs, counters = _read(spec)
  assert docs == [["alpha beta", "gamma"], ["delta"]]
  assert counters.lines_total() == total
  assert (counters.bad_records_skipped, counters.empty_records, counters.blank_lines) == (4, 1, 1)
  with pytest.raises(CorpusError, match=r"d\.jsonl\.gz:4: not a JSON object"):
    _read(CorpusSpec(train_files=spec.train_files, format="jsonl"))


def test_jsonl_custom_text_field(tmp_path):
  (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x y"}) + "\n")
  docs, _ = _read(CorpusSpec(train_files=str(tmp_path / "c.jsonl"), format="jsonl",
                             text_field="body"))
  assert docs == [["x y"]]


def test_truncated_gzip_names_the_file(tmp_path):
  data = gzip.compress(b"some text that is long enough to be cut\n" * 200)
  (tmp_path / "cut.txt.gz").write_bytes(data[:len(data) // 2])
  with pytest.raises(CorpusError, match=r"cut\.txt\.gz: truncated or corrupt gzip"):
    _read(CorpusSpec(train_files=str(tmp_path / "cut.txt.gz")))


def test_globs(tmp_path):
  (tmp_path / "sub").mkdir()
  (tmp_path / "sub" / "b.txt").write_text("b\n")
  (tmp_path / "a.txt").write_text("a\n")
  pattern = f"{tmp_path}/*.txt, {tmp_path}/sub/*.txt,{tmp_path}/a.txt"  # a.txt listed twice
  docs, counters = _read(CorpusSpec(train_files=pattern))
  assert docs == [["a"], ["b"]] and counters.files == 2
  with pytest.raises(CorpusError, match=r"'[^']*/nothing-\*\.txt' matches no file"):
    _read(CorpusSpec(train_files=f"{tmp_path}/a.txt,{tmp_path}/nothing-*.txt"))
  with pytest.raises(CorpusError, match="missing.txt' matches no file"):
    _read(CorpusSpec(train_files=f"{tmp_path}/missing.txt"))


def test_tfds_missing_dataset_is_a_clear_error(tmp_path):
  spec = CorpusSpec(format="tfds", tfds_name="no_such_dataset_xyz", tfds_data_dir=str(tmp_path))
  with pytest.raises(CorpusError, match="no_such_dataset_xyz.*Prepare it first"):
    _read(spec)


def test_default_corpus():
  docs, counters = _read(CorpusSpec())
  size = sum(len(s) for d in docs for s in d)
  assert 1_000_000 < size < 3_500_000 and len(docs) > 300
  assert counters.lines_total() == sum(map(len, docs)) and counters.documents == len(docs)
  assert all(s and s == " ".join(s.split()) for d in docs for s in d)
  texts = {s for d in docs for s in d}
  assert any("regular expression" in s.lower() for s in texts)
  assert docs == [list(d) for d in default_documents()]  # cached, fixed order
