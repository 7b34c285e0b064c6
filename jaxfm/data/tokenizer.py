"""BERT WordPiece tokenizer: load (vocab.txt / tokenizer.json), train, save.

A thin wrapper over the `tokenizers` library (Rust, parallel batch encoding). Saved
folders hold both `vocab.txt` and `tokenizer.json`, which HF `BertTokenizerFast` reads.
"""

from __future__ import annotations

import collections
import dataclasses
import unicodedata
from collections.abc import Sequence

import numpy as np
from etils import epath
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)  # ids 0..4 in a trained vocabulary
VOCAB_FILE = "vocab.txt"
TOKENIZER_FILE = "tokenizer.json"
_PREFIX = "##"  # WordPiece continuation prefix


class TokenizerError(ValueError):
  """A tokenizer file is missing, unreadable or lacks a BERT special token."""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """Ids of the BERT special tokens."""
  pad: int
  unk: int
  cls: int
  sep: int
  mask: int


class WordPieceTokenizer:
  """A BERT WordPiece tokenizer that never pads, truncates or adds special tokens."""

  def __init__(self, tokenizer: Tokenizer):
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self._tokenizer = tokenizer
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    self.vocab_size = len(vocab)
    if sorted(vocab.values()) != list(range(self.vocab_size)):
      raise TokenizerError("token ids are not contiguous from 0")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
      raise TokenizerError(f"vocabulary lacks the BERT special tokens {missing}")
    self.special_ids = SpecialIds(*(vocab[t] for t in SPECIAL_TOKENS))
    prefix = getattr(tokenizer.model, "continuing_subword_prefix", _PREFIX)
    # [vocab] True for tokens that begin a word (all but '##' continuation pieces).
    self.word_start = np.ones(self.vocab_size, dtype=bool)
    for token, index in vocab.items():
      if token.startswith(prefix) and len(token) > len(prefix):
        self.word_start[index] = False

  @property
  def backend(self) -> Tokenizer:
    """The underlying `tokenizers.Tokenizer` (offsets, word ids), for the task converters."""
    return self._tokenizer

  @property
  def vocab(self) -> dict[str, int]:
    """Token string -> id."""
    return self._tokenizer.get_vocab(with_added_tokens=True)

  def to_json(self) -> str:
    """The `tokenizer.json` text (the full pipeline: normaliser, pre-tokeniser, vocabulary)."""
    return self._tokenizer.to_str(pretty=True)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens (encoded in parallel)."""
    encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    return [e.ids for e in encodings]

  def tokens(self, text: str) -> list[str]:
    """The WordPiece strings of one text (for inspection and tests)."""
    return self._tokenizer.encode(text, add_special_tokens=False).tokens

  def decode(self, ids: Sequence[int]) -> str:
    return self._tokenizer.decode(list(ids), skip_special_tokens=False)

  def save(self, folder: str | epath.Path) -> None:
    """Writes `vocab.txt` and `tokenizer.json`, each atomically (write, then rename)."""
    folder = epath.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = self.vocab
    files = {VOCAB_FILE: "".join(t + "\n" for t in sorted(vocab, key=vocab.get)),
             TOKENIZER_FILE: self.to_json()}
    for name, text in files.items():  # each file appears whole or not at all
      partial = folder / (name + ".tmp")
      partial.write_text(text, encoding="utf-8")
      partial.replace(folder / name)


def _bert_tokenizer(vocab: dict[str, int], lowercase: bool) -> Tokenizer:
  """The BERT pipeline: normalise, split words/punctuation/CJK chars, WordPiece."""
  tokenizer = Tokenizer(models.WordPiece(vocab, unk_token=UNK, continuing_subword_prefix=_PREFIX,
                                         max_input_chars_per_word=100))
  tokenizer.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece(prefix=_PREFIX)
  if CLS in vocab and SEP in vocab:
    tokenizer.post_processor = processors.BertProcessing((SEP, vocab[SEP]), (CLS, vocab[CLS]))
  return tokenizer


def has_tokenizer(folder: str | epath.Path) -> bool:
  """Whether `folder` holds a saved tokenizer."""
  folder = epath.Path(folder)
  return (folder / TOKENIZER_FILE).exists() or (folder / VOCAB_FILE).exists()


def load_tokenizer(path: str | epath.Path, *, lowercase: bool = True) -> WordPieceTokenizer:
  """Loads `tokenizer.json`, `vocab.txt`, or a folder holding either (json preferred).

  Args:
    path: a file or folder, local or remote (`gs://`).
    lowercase: used for `vocab.txt` only (`tokenizer.json` carries its own normaliser).
  """
  path = epath.Path(path)
  if path.is_dir():
    path = path / TOKENIZER_FILE if (path / TOKENIZER_FILE).exists() else path / VOCAB_FILE
  if not path.exists():
    raise TokenizerError(f"no tokenizer at {path} (expected {TOKENIZER_FILE} or {VOCAB_FILE})")
  text = path.read_text(encoding="utf-8")
  if path.name.endswith(".json"):
    try:
      return WordPieceTokenizer(Tokenizer.from_str(text))
    except Exception as e:  # the Rust side raises a bare Exception
      raise TokenizerError(f"{path}: not a tokenizers JSON file: {e}") from e
  tokens = [line.rstrip("\r") for line in text.split("\n")]
  if tokens and not tokens[-1]:
    tokens.pop()
  return WordPieceTokenizer(_bert_tokenizer({t: i for i, t in enumerate(tokens)}, lowercase))


_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def is_cjk_char(char: str) -> bool:
  """A character in BERT's CJK ideograph ranges (each is a word of its own)."""
  code = ord(char)
  return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _is_word_boundary_char(char: str) -> bool:
  """Punctuation and CJK characters always form a word of their own under BERT rules."""
  code = ord(char)
  return (unicodedata.category(char).startswith("P") or 33 <= code <= 47 or 58 <= code <= 64
          or 91 <= code <= 96 or 123 <= code <= 126 or is_cjk_char(char))


def _continuation_pieces(texts: Sequence[str], normalizer: normalizers.Normalizer,
                         limit_alphabet: int, cjk: bool = False) -> list[str]:
  """Sorted '##c' for every character c of the training alphabet that can continue a word
  (with `cjk`, CJK characters too: segmented-word masking marks word-inner characters so).

  The trainer keeps the `limit_alphabet` most frequent characters; ties at the cut are all
  kept here, since a missing piece would bring back the non-determinism.
  """
  counts: collections.Counter[str] = collections.Counter()
  for text in texts:
    counts.update(normalizer.normalize_str(text))
  frequencies = sorted((n for c, n in counts.items() if not c.isspace()), reverse=True)
  cut = frequencies[min(limit_alphabet, len(frequencies)) - 1] if frequencies else 0
  return sorted(_PREFIX + c for c, n in counts.items()
                if n >= cut and not c.isspace()
                and (not _is_word_boundary_char(c) or (cjk and is_cjk_char(c))))


def train_tokenizer(texts: Sequence[str], *, vocab_size: int, lowercase: bool = True,
                    min_frequency: int = 2, limit_alphabet: int | None = None,
                    cjk_pieces: bool = False) -> WordPieceTokenizer:
  """Trains a BERT WordPiece vocabulary ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) on `texts`.

  `limit_alphabet` characters at most are kept (the most frequent); None keeps up to
  max(1000, vocab_size // 2), room for the thousands of characters Chinese text needs, as
  bert-base-chinese's vocabulary has them. `cjk_pieces` adds the '##c' piece of every kept CJK
  character, which whole-word masking of segmented Chinese needs
  (`jaxfm.data.word_segmentation`) and bert-base-chinese's vocabulary also has.

  The result is deterministic for the same texts. `tokenizers` alone is not (it numbers
  the '##c' continuation characters in hash-map order, which then breaks merge ties:
  huggingface/tokenizers#1794), so they are numbered up front, sorted, as reserved tokens
  and become ordinary vocabulary entries afterwards. The vocabulary can be smaller than
  `vocab_size` when the corpus has fewer distinct pieces.
  """
  if limit_alphabet is None:
    limit_alphabet = max(1000, vocab_size // 2)
  tokenizer = _bert_tokenizer({}, lowercase)
  reserved = list(SPECIAL_TOKENS) + _continuation_pieces(texts, tokenizer.normalizer,
                                                           limit_alphabet, cjk_pieces)
  trainer = trainers.WordPieceTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
      special_tokens=reserved, limit_alphabet=limit_alphabet, continuing_subword_prefix=_PREFIX)
  tokenizer.train_from_iterator(texts, trainer=trainer)
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  # Rebuild without added tokens: the reserved pieces become plain WordPiece entries and the
  # post-processor learns the trained [CLS]/[SEP] ids.
  return WordPieceTokenizer(_bert_tokenizer(vocab, lowercase))
