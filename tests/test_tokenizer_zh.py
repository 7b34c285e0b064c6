"""Chinese WordPiece: jaxfm matches transformers' BertTokenizer on a bert-base-chinese-style vocab.

`fixtures/zh_vocab.txt` (3,470 tokens, laid out like bert-base-chinese's: [PAD], [unusedN], [UNK],
[CLS], [SEP], [MASK], ASCII, full-width punctuation, ~3,000 common CJK characters, some `##`
pieces and English words) was built once from character counts of the development corpus;
`fixtures/zh_lines.txt` holds 100 hand-written lines of mixed text. Rare characters in them
(𠀀 龘 𪚥 𡃁 …) are deliberately left out of the vocabulary, so they must become [UNK].
"""

import csv
import itertools
import pathlib
import unicodedata

import numpy as np
import pytest

from jaxfm.data.tokenizer import load_tokenizer, train_tokenizer

transformers = pytest.importorskip("transformers")

_FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
_VOCAB = _FIXTURES / "zh_vocab.txt"
_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "chinese"
_RARE = "𠀀𠀁龘靐齉爩𪚥𡃁"


def _fixture_lines():
  return _FIXTURES.joinpath("zh_lines.txt").read_text(encoding="utf-8").splitlines()


def _shared_lines(per_source=1000):
  """Up to `per_source` lines of each development text (segmentation spaces removed)."""
  text = _SHARED / "text"
  lines = [line.replace(" ", "") for line in itertools.islice(
      (text / "peoples_daily_199801_seg.txt").open(encoding="utf-8"), per_source)]
  with (text / "thucnews_1000.tsv").open(encoding="utf-8") as f:  # article sentences
    sentences = (s + "。" for row in f for s in row.split("\t", 1)[1].split("。") if s.strip())
    lines += list(itertools.islice(sentences, per_source))
  for name in ("waimai_10k/dev.tsv", "online_shopping_7cats/dev.tsv"):
    with (_SHARED / name).open(encoding="utf-8", newline="") as f:
      rows = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
      lines += [row["sentence"] for row in itertools.islice(rows, per_source)]
  return [line.rstrip("\n") for line in lines]


def _references():
  """transformers' tokenizers over the same vocab.txt: the Rust-backed one and, when present,
  the pure-Python one of the original BERT (transformers 5 names it BertTokenizerLegacy)."""
  refs = {"BertTokenizer": transformers.BertTokenizer(vocab=str(_VOCAB), do_lower_case=True,
                                                      tokenize_chinese_chars=True)}
  if transformers.BertTokenizerFast is not transformers.BertTokenizer:  # transformers 4
    refs["BertTokenizerFast"] = transformers.BertTokenizerFast(
        vocab_file=str(_VOCAB), do_lower_case=True, tokenize_chinese_chars=True)
  legacy = getattr(transformers, "BertTokenizerLegacy", None)
  if legacy is not None:
    refs["BertTokenizerLegacy"] = legacy(str(_VOCAB), do_lower_case=True,
                                         tokenize_chinese_chars=True)
  for name, ref in refs.items():
    assert len(ref) == 3470, name  # the vocabulary was read, not a placeholder
  return refs


def _assert_parity(lines):
  ours = load_tokenizer(_VOCAB, lowercase=True)
  want = ours.encode_batch(lines)
  for name, ref in _references().items():
    got = ref(lines, add_special_tokens=False)["input_ids"]
    bad = [(line, ours.tokens(line), ref.convert_ids_to_tokens(ids))
           for line, ids, mine in zip(lines, got, want) if ids != mine]
    assert not bad, f"{name}: {len(bad)} of {len(lines)} lines differ, e.g. {bad[:2]}"
  return want


def test_fixture_covers_hard_cases():
  tok = load_tokenizer(_VOCAB, lowercase=True)
  lines = _fixture_lines()
  assert len(lines) >= 100
  tokens = [t for line in lines for t in tok.tokens(line)]
  assert {"中", "國", "，", "。", "“", "《", "##ing", "iphone", "2008"} <= set(tokens)
  for char in _RARE:
    assert tok.tokens(char) == ["[UNK]"], char
  assert tok.tokens("我用iPhone拍了𡃁照片😀") == [
      "我", "用", "iphone", "拍", "了", "[UNK]", "照", "片", "😀"]
  assert tokens.count("[UNK]") >= 10


def test_ids_match_transformers_on_fixture():
  want = _assert_parity(_fixture_lines())
  print(f"\nzh tokenizer parity: {len(want)} fixture lines, {sum(map(len, want))} ids identical")


@pytest.mark.skipif(not _SHARED.is_dir(), reason="no ../shared/data/chinese development data")
def test_ids_match_transformers_on_development_text():
  lines = _shared_lines()
  assert len(lines) >= 3000
  want = _assert_parity(lines)
  print(f"\nzh tokenizer parity: {len(lines)} development lines, "
        f"{sum(map(len, want))} ids identical")


def _is_cjk(char):
  return unicodedata.name(char, "").startswith("CJK")


def test_training_splits_cjk_characters():
  """Trained on Chinese, every CJK token is one character (as in bert-base-chinese); Latin words
  still get `##` continuations."""
  lines = _fixture_lines() * 5
  tok = train_tokenizer(lines, vocab_size=2000, min_frequency=2)
  multi = [t for t in tok.vocab if len(t.removeprefix("##")) > 1 and any(map(_is_cjk, t))]
  assert not multi, multi[:20]
  assert sum(1 for t in tok.vocab if len(t) == 1 and _is_cjk(t)) > 500
  latin = [t for t in tok.vocab if t.startswith("##") and t[2:].isascii() and t[2:].isalpha()]
  assert "##able" in latin and len(latin) > 20
  assert tok.tokens("北京是中华人民共和国的首都") == list("北京是中华人民共和国的首都")


def test_edge_characters_match_rust_bert_tokenizer():
  """Where transformers' two BERT tokenizers disagree, jaxfm follows the Rust one (`BertTokenizer`
  in transformers 5; it also reads jaxfm's saved tokenizer.json). The pure-Python
  BertTokenizerLegacy (original BERT) differs on U+2B820..U+2B91F, which tokenizers'
  BertNormalizer leaves out of CJK Extension E (huggingface/tokenizers#2395), and it drops
  unassigned code points."""
  ours = load_tokenizer(_VOCAB, lowercase=True)
  ref = transformers.BertTokenizer(vocab=str(_VOCAB), do_lower_case=True,
                                   tokenize_chinese_chars=True)
  edge = ["a\U0002B820b", "中\U0002B8FF文", "x\U0002B81Fy", "x\U0002CEB0y", "x\U0002F800y",
          "x\u3007y", "a\u00adb", "a\ufffdb", "a\x7fb", "a\u2028b", "a\x85b", "ǅİstanbul", "ﬁ",
          "👩\u200d💻🇯🇵"]
  got = ref(edge, add_special_tokens=False)["input_ids"]
  assert ours.encode_batch(edge) == got


def test_training_keeps_thousands_of_cjk_characters():
  """A Chinese corpus needs more than the 1,000-character alphabet an English one does."""
  chars = [chr(0x4E00 + i) for i in range(1500)]  # 1,500 distinct CJK characters
  rng = np.random.default_rng(0)
  lines = ["".join(rng.choice(chars, 40)) for _ in range(600)]  # each character ~16 times
  vocab = train_tokenizer(lines, vocab_size=4000).backend.get_vocab()
  assert all(c in vocab for c in chars)
