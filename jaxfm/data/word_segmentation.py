"""Chinese whole-word masking: words from a segmenter, marked the way Chinese-BERT-wwm marks them.

BERT splits Chinese text into single characters, so its whole-word masking masks characters.
Chinese-BERT-wwm segments the text into words and masks the characters of one word together:
a character inside a word (not its first) becomes its `##` continuation piece for the masker
(transformers' `run_chinese_ref.py` + `DataCollatorForWholeWordMask` do the same with a
reference file). Here the continuation id is stored in the packed example itself, so prepared
shards, packing and the masker need no extra array, and the masks stay a pure function of
(seed, epoch, index); `Masking` maps every `##X` back to `X` before the model sees it.

The segmenter is jieba (`pip install 'jaxfm[zh]'`), with an optional user dictionary.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxfm.data.tokenizer import WordPieceTokenizer, is_cjk_char

SEGMENTERS = ("jieba",)
_PREFIX = "##"


def cjk_continuations(vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
  """(ids of `X`, ids of `##X`) [N] for every single CJK character `X` with both in `vocab`."""
  pairs = sorted((vocab[t[len(_PREFIX):]], i) for t, i in vocab.items()
                 if t.startswith(_PREFIX) and len(t) == len(_PREFIX) + 1
                 and is_cjk_char(t[-1]) and t[len(_PREFIX):] in vocab)
  ids = np.array(pairs, np.int32).reshape(-1, 2)
  return ids[:, 0], ids[:, 1]


class WordMarkingTokenizer:
  """`WordPieceTokenizer.encode_batch`, with each CJK character that continues a segmented word
  encoded as its `##` piece; everything else (and what a fine-tuning run sees) is unchanged.

  A character whose `##` piece is not in the vocabulary stays a word of its own (counted in
  `unmarkable`). Stands in for the tokenizer where pretraining data is built.
  """

  def __init__(self, tokenizer: WordPieceTokenizer, segmenter: str = "jieba",
               user_dict: str = ""):
    if segmenter not in SEGMENTERS:
      raise ValueError(f"data.word_segmenter={segmenter!r}: choose '' or one of {SEGMENTERS}")
    try:
      import jieba  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("data.word_segmenter='jieba' needs jieba: pip install 'jaxfm[zh]'") from e
    self._jieba = jieba.Tokenizer()  # its own dictionary state, not jieba's global one
    if user_dict:
      try:
        self._jieba.load_userdict(user_dict)
      except OSError as e:
        raise ValueError(f"data.word_segmenter_dict={user_dict!r}: {e}") from e
    self._tokenizer = tokenizer
    self.vocab_size, self.special_ids = tokenizer.vocab_size, tokenizer.special_ids
    chars, pieces = cjk_continuations(tokenizer.vocab)
    self._piece_of = np.full(tokenizer.vocab_size, -1, np.int32)  # [vocab] X -> ##X or -1
    self._piece_of[chars] = pieces
    self.marked = self.unmarkable = 0  # continuation characters, and those left unmarked

  def word_ids(self, text: str) -> np.ndarray:
    """int32 [len(text)]: which segmented word each character belongs to."""
    ids = np.zeros(len(text), np.int32)
    for number, (_, start, end) in enumerate(self._jieba.tokenize(text, HMM=True)):
      ids[start:end] = number
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text (no special tokens), continuation characters as `##` pieces."""
    encodings = self._tokenizer.backend.encode_batch(list(texts), add_special_tokens=False)
    out = []
    for text, encoding in zip(texts, encodings):
      ids = np.asarray(encoding.ids, np.int32)  # [n]
      starts = np.array([s for s, _ in encoding.offsets], np.int64)  # [n] character offsets
      if len(ids) > 1:
        word = self.word_ids(text)[np.minimum(starts, len(text) - 1)]  # [n]
        inside = np.zeros(len(ids), bool)
        inside[1:] = (word[1:] == word[:-1]) & (starts[1:] > starts[:-1])
        inside &= np.array([is_cjk_char(text[s]) if s < len(text) else False for s in starts])
        pieces = self._piece_of[ids]  # [n]
        self.marked += int((inside & (pieces >= 0)).sum())
        self.unmarkable += int((inside & (pieces < 0)).sum())
        ids = np.where(inside & (pieces >= 0), pieces, ids)
      out.append(ids.tolist())
    return out
