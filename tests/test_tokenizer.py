"""WordPiece tokenizer: train, save, load, special tokens, CJK, CLI."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxfm.data.tokenizer import (SPECIAL_TOKENS, TokenizerError, has_tokenizer, load_tokenizer,
                                  train_tokenizer)

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TEXTS = [
    "The Quick brown fox jumps over the lazy dog.",
    "Unbelievable things happen: foxes, dogs and jumping cats!",
    "Café résumé naïve façade — accents everywhere.",
    "中文字符 中文 文字",
    "quickly quicker quickest jumps jumped jumping",
] * 20


@pytest.fixture(scope="module")
def uncased():
  return train_tokenizer(_TEXTS, vocab_size=300)


def test_special_tokens_and_word_starts(uncased):
  assert uncased.special_ids.pad == 0
  assert [uncased.special_ids.pad, uncased.special_ids.unk, uncased.special_ids.cls,
          uncased.special_ids.sep, uncased.special_ids.mask] == [0, 1, 2, 3, 4]
  assert uncased.vocab_size <= 300
  for token, index in uncased.vocab.items():
    assert uncased.word_start[index] == (not token.startswith("##") or token == "##")
  ids = uncased.encode_batch(["jumping foxes", ""])
  assert ids[1] == [] and not set(ids[0]) & set(range(len(SPECIAL_TOKENS)))
  pieces = uncased.tokens("jumping foxes")
  assert [uncased.word_start[i] for i in ids[0]] == [not p.startswith("##") for p in pieces]


def test_uncased_and_cased(uncased):
  assert uncased.tokens("Café QUICK") == uncased.tokens("cafe quick")
  cased = train_tokenizer(_TEXTS, vocab_size=300, lowercase=False)
  assert cased.tokens("Quick")[0] == "Quick"
  assert "é" in "".join(cased.tokens("Café"))


def test_cjk_splits_per_character(uncased):
  assert uncased.tokens("中文字符") == ["中", "文", "字", "符"]
  assert uncased.special_ids.unk not in uncased.encode_batch(["中文"])[0]


def test_training_is_deterministic():
  first = train_tokenizer(_TEXTS, vocab_size=300)
  for _ in range(2):
    again = train_tokenizer(_TEXTS, vocab_size=300)
    assert again.to_json() == first.to_json()


def test_save_and_load_round_trip(uncased, tmp_path):
  assert not has_tokenizer(tmp_path)
  uncased.save(tmp_path)
  assert has_tokenizer(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "vocab.txt"]
  texts = ["The Café fox jumped, 中文!", "unseen zebra words"]
  want = uncased.encode_batch(texts)
  for path in (tmp_path, tmp_path / "tokenizer.json", tmp_path / "vocab.txt"):
    loaded = load_tokenizer(path)
    assert loaded.encode_batch(texts) == want
    assert loaded.special_ids == uncased.special_ids
    np.testing.assert_array_equal(loaded.word_start, uncased.word_start)
  assert load_tokenizer(tmp_path / "vocab.txt", lowercase=False).tokens("The")[0] != "the"


def test_load_errors(tmp_path):
  with pytest.raises(TokenizerError, match="no tokenizer at"):
    load_tokenizer(tmp_path)
  (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
  with pytest.raises(TokenizerError, match=r"lacks the BERT special tokens \['\[CLS\]'"):
    load_tokenizer(tmp_path / "vocab.txt")


def test_cli_trains_a_vocabulary(tmp_path):
  (tmp_path / "in.txt").write_text("\n\n".join(_TEXTS))
  out = tmp_path / "tok"
  result = subprocess.run(
      [sys.executable, "-m", "jaxfm.tokenizer", "train", f"--input={tmp_path}/*.txt",
       f"--out={out}", "--vocab_size=200", "--cased"],
      cwd=_ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr
  assert "vocabulary" in result.stdout
  tokenizer = load_tokenizer(out)
  assert tokenizer.vocab_size <= 200 and tokenizer.tokens("Quick")[0] == "Quick"
