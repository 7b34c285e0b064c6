"""Chinese whole-word masking: jieba's words become masking units, the model sees plain ids."""

from pathlib import Path

import numpy as np
import pytest

from jaxfm.data.pretraining import Masking, mask_batch
from jaxfm.data.tokenizer import SPECIAL_TOKENS, WordPieceTokenizer, _bert_tokenizer
from jaxfm.data.word_segmentation import WordMarkingTokenizer

jieba = pytest.importorskip("jieba")

TEXT = "我们喜欢自然语言处理，今天北京天气很好。买了T恤和手机"
PEOPLES_DAILY = (Path(__file__).resolve().parents[2] / "shared" / "data" / "chinese" / "text"
                 / "peoples_daily_199801_seg.txt")


def _tokenizer(text: str, without_piece: str = "") -> WordPieceTokenizer:
  """Specials, every character of `text` and its '##' piece (but `without_piece`'s)."""
  chars = sorted(set(text.lower()) - {" "})
  tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars if c != without_piece)]
  return WordPieceTokenizer(_bert_tokenizer({t: i for i, t in enumerate(tokens)}, True))


def _units(tokenizer: WordPieceTokenizer, ids: list[int]) -> list[str]:
  """The masking units of `ids`: a word starts at every non-'##' piece."""
  inverse = {i: t for t, i in tokenizer.vocab.items()}
  units: list[str] = []
  for token in (inverse[i] for i in ids):
    if token.startswith("##"):
      units[-1] += token[2:]
    else:
      units.append(token)
  return units


def test_characters_inside_a_segmented_word_become_its_continuation_pieces():
  tokenizer = _tokenizer(TEXT)
  marker = WordMarkingTokenizer(tokenizer)
  [ids] = marker.encode_batch([TEXT])
  words = [w.lower() for w, _, _ in jieba.Tokenizer().tokenize(TEXT)]
  assert _units(tokenizer, ids) == words
  assert "自然语言" in words and "t恤" in words  # a Latin letter and a CJK character: one unit
  assert marker.marked == sum(len(w) - 1 for w in words) and marker.unmarkable == 0
  # Without a segmenter every CJK character is a word of its own.
  assert _units(tokenizer, tokenizer.encode_batch([TEXT])[0]) != words


def test_the_model_sees_plain_ids_and_labels_and_whole_words_are_masked_together():
  tokenizer = _tokenizer(TEXT)
  [marked] = WordMarkingTokenizer(tokenizer).encode_batch([TEXT])
  [plain] = tokenizer.encode_batch([TEXT])
  special = tokenizer.special_ids
  row = np.full(64, special.pad, np.int32)
  row[0], row[1:len(marked) + 1], row[len(marked) + 1] = special.cls, marked, special.sep
  masking = Masking.for_tokenizer(tokenizer, max_predictions=20, mask_prob=0.4, whole_word=True)
  unit_of = np.cumsum(masking.word_start[row])  # [T] which unit each position is in
  for index in range(20):
    out = mask_batch(row[None], np.array([len(marked) + 2]), np.array([64]), masking, seed=0,
                     epochs=np.array([0]), indices=np.array([index]))
    chosen = out["masked_positions"][0][out["masked_weights"][0] > 0]
    np.testing.assert_array_equal(out["masked_ids"][0][:len(chosen)],
                                  np.asarray(plain)[chosen - 1])  # labels: the plain characters
    for unit in set(unit_of[chosen]):  # every unit touched is masked whole
      assert set(np.flatnonzero(unit_of == unit)) <= set(chosen), (index, unit)
    unmasked = np.setdiff1d(np.arange(1, len(marked) + 1), chosen)
    np.testing.assert_array_equal(out["input_ids"][0][unmasked],
                                  np.asarray(plain)[unmasked - 1])  # no '##' piece reaches it


def test_a_character_without_a_continuation_piece_stays_a_word_and_is_counted():
  tokenizer = _tokenizer(TEXT, without_piece="言")
  marker = WordMarkingTokenizer(tokenizer)
  [ids] = marker.encode_batch([TEXT])
  assert "自然语" in _units(tokenizer, ids) and "言" in _units(tokenizer, ids)
  assert marker.unmarkable == 1


def test_a_user_dictionary_changes_the_units(tmp_path):
  tokenizer = _tokenizer(TEXT)
  user_dict = tmp_path / "words.txt"
  user_dict.write_text("天气很好 100000 n\n", encoding="utf-8")
  [ids] = WordMarkingTokenizer(tokenizer, user_dict=str(user_dict)).encode_batch([TEXT])
  assert "天气很好" in _units(tokenizer, ids)


def test_bad_segmenter_settings_name_the_field(tmp_path):
  tokenizer = _tokenizer(TEXT)
  with pytest.raises(ValueError, match="data.word_segmenter='ltp'"):
    WordMarkingTokenizer(tokenizer, segmenter="ltp")
  with pytest.raises(ValueError, match="data.word_segmenter_dict="):
    WordMarkingTokenizer(tokenizer, user_dict=str(tmp_path / "missing.txt"))


@pytest.mark.skipif(not PEOPLES_DAILY.exists(), reason="../shared/data/chinese is not here")
def test_units_agree_with_the_human_segmentation_of_peoples_daily_as_jieba_does():
  lines = [line.split() for line in PEOPLES_DAILY.read_text(encoding="utf-8").splitlines()[:300]
           if line.strip()]
  texts = ["".join(words) for words in lines]
  tokenizer = _tokenizer("".join(texts))
  units = [_units(tokenizer, ids) for ids in WordMarkingTokenizer(tokenizer).encode_batch(texts)]

  def boundaries(words: list[str]) -> set[int]:
    return set(np.cumsum([len(w) for w in words]).tolist())

  gold = [boundaries([w.lower() for w in words]) for words in lines]
  segmenter = jieba.Tokenizer()
  jieba_words = [[w.lower() for w, _, _ in segmenter.tokenize(t)] for t in texts]
  ours = sum(len(boundaries(u) & g) for u, g in zip(units, gold))
  theirs = sum(len(boundaries(w) & g) for w, g in zip(jieba_words, gold))
  # Our units are jieba's words: the same boundaries agree with the human segmentation.
  assert ours == theirs
  recall = ours / sum(len(g) for g in gold)
  assert recall > 0.85, recall


def test_pretraining_data_marks_words_trains_their_pieces_and_masks_them_whole(tmp_path):
  from jaxfm.config import pretrain_defaults
  from jaxfm.data import loader, mlm_data
  corpus = Path(__file__).parent / "fixtures" / "zh_lines.txt"
  cfg = pretrain_defaults().data
  cfg.update(dict(train_files=str(corpus), documents="line", vocab_size=2000, max_seq_length=32,
                  max_predictions_per_seq=8, eval_fraction=0.0, whole_word_masking=True,
                  word_segmenter="jieba", worker_count=0))
  data = mlm_data.build_pretraining_data(cfg, str(tmp_path / "tokenizer"),
                                         max_position_embeddings=64)
  vocab = data.tokenizer.vocab
  assert vocab["##然"] and vocab["然"]  # the trained vocabulary has the CJK pieces
  pieces = {i for t, i in vocab.items() if t.startswith("##") and is_cjk(t[2:])}
  tokens = data.train.tokens  # [examples, T]
  assert np.isin(tokens, list(pieces)).any()  # the stored examples carry the word marks
  batch = next(iter(data.train_iterator(loader.HostLayout(8, 0, 1, 1))))
  assert not np.isin(batch["input_ids"], list(pieces)).any()  # the model never sees them
  assert not np.isin(batch["masked_ids"][batch["masked_weights"] > 0], list(pieces)).any()


def is_cjk(text: str) -> bool:
  from jaxfm.data.tokenizer import is_cjk_char
  return len(text) == 1 and is_cjk_char(text)
