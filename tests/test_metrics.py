"""Metrics against their references: scikit-learn, scipy, seqeval, the official SQuAD rules."""

import warnings

import numpy as np
import pytest
import scipy.stats
import seqeval.metrics
import sklearn.metrics
from seqeval.metrics.sequence_labeling import get_entities as seqeval_entities

from jaxfm.metrics import classification, ner, squad


@pytest.fixture(autouse=True)
def _quiet():
  # seqeval / sklearn / scipy warn about ill-defined scores in the edge cases tested here.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    yield


# Classification / regression.

def _sklearn_scores(preds, labels):
  return {"accuracy": sklearn.metrics.accuracy_score(labels, preds),
          "macro_f1": sklearn.metrics.f1_score(labels, preds, average="macro"),
          "mcc": sklearn.metrics.matthews_corrcoef(labels, preds)}


def _ours(preds, labels, weights=None):
  return {"accuracy": classification.accuracy(preds, labels, weights),
          "macro_f1": classification.macro_f1(preds, labels, weights),
          "mcc": classification.matthews_corrcoef(preds, labels, weights)}


@pytest.mark.parametrize("preds, labels", [
    ([0, 0, 0, 0], [0, 1, 0, 1]),  # constant predictions: MCC 0
    ([1, 1, 1], [1, 1, 1]),  # a single class everywhere
    ([2, 0, 1, 1], [0, 0, 1, 2]),
    ([0, 3, 3, 0, 1], [0, 3, 3, 0, 2]),  # classes present in one side only
    ([1, 0], [0, 1]),  # MCC -1
])
def test_classification_hand_cases_match_sklearn(preds, labels):
  np.testing.assert_allclose(list(_ours(preds, labels).values()),
                             list(_sklearn_scores(preds, labels).values()), atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_classification_random_cases_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n, k = rng.integers(1, 60), rng.integers(2, 6)
  labels, preds = rng.integers(0, k, n), rng.integers(0, k, n)
  agree = rng.random(n) < 0.5
  preds[agree] = labels[agree]
  weights = (rng.random(n) < 0.8).astype(np.float32)
  weights[0] = 1
  keep = weights.astype(bool)
  np.testing.assert_allclose(list(_ours(preds, labels, weights).values()),
                             list(_sklearn_scores(preds[keep], labels[keep]).values()), atol=1e-12)
  binary_p, binary_l = preds % 2, labels % 2
  assert classification.binary_f1(binary_p, binary_l, weights) == pytest.approx(
      sklearn.metrics.f1_score(binary_l[keep], binary_p[keep]), abs=1e-12)


def test_binary_f1_edge_cases():
  assert classification.binary_f1([0, 0], [0, 0]) == 0.0  # no positives at all, like sklearn
  assert classification.binary_f1([1, 0], [0, 1]) == 0.0
  with pytest.raises(ValueError, match="0 and 1"):
    classification.binary_f1([2, 0], [0, 1])


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(3, 80))
  labels = rng.integers(0, 6, n).astype(np.float32)  # many ties
  preds = np.round(labels + rng.normal(0, 2, n), 1)
  preds[: n // 3] = preds[0]  # more ties
  assert classification.pearson(preds, labels) == pytest.approx(
      scipy.stats.pearsonr(preds, labels)[0], abs=1e-9)
  assert classification.spearman(preds, labels) == pytest.approx(
      scipy.stats.spearmanr(preds, labels)[0], abs=1e-9)
  np.testing.assert_array_equal(classification.average_ranks(preds), scipy.stats.rankdata(preds))


def test_correlation_edge_cases():
  assert classification.pearson([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]) == 0.0  # undefined -> 0
  assert classification.spearman([3.0, 3.0], [0.0, 1.0]) == 0.0
  assert np.isnan(classification.pearson([np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]))
  assert np.isnan(classification.spearman([np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]))
  assert classification.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_weights_drop_padding_and_are_checked():
  preds, labels = [1, 0, 5, 5], [1, 1, 7, 7]
  weights = [1, 1, 0, 0]  # padding rows with junk classes must not count as classes
  assert classification.macro_f1(preds, labels, weights) == pytest.approx(
      sklearn.metrics.f1_score([1, 1], [1, 0], average="macro"))
  with pytest.raises(ValueError, match="0 \\(padding\\) or 1"):
    classification.accuracy(preds, labels, [1, 0.5, 0, 0])
  with pytest.raises(ValueError, match="no examples"):
    classification.accuracy(preds, labels, [0, 0, 0, 0])
  with pytest.raises(ValueError, match="differ in length"):
    classification.accuracy([1], [1, 0])


def test_compute_by_task_type():
  logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [5.0, 5.5]])
  labels = np.array([0, 1, 1, 0])
  out = classification.compute("binary", logits, labels, weights=[1, 1, 1, 0])
  assert out == pytest.approx({"accuracy": 2 / 3, "f1": 2 / 3, "num_examples": 3,
                               "mcc": sklearn.metrics.matthews_corrcoef([0, 1, 1], [0, 1, 0])})
  out = classification.compute("multiclass", [0, 2, 1], [0, 2, 2])
  assert set(out) == {"accuracy", "macro_f1", "mcc", "num_examples"}
  out = classification.compute("regression", np.array([[0.5], [1.0], [3.0]]), [0.0, 1.0, 2.0])
  assert out["spearman"] == pytest.approx(1.0) and out["mse"] == pytest.approx(1.25 / 3)
  with pytest.raises(ValueError, match="task_type"):
    classification.compute("ranking", [0], [0])


# NER.

TRICKY = [
    ["O", "I-PER", "I-PER", "O"],  # I- after O starts an entity
    ["B-PER", "I-LOC", "I-LOC", "O"],  # a type change splits
    ["B-PER", "I-PER", "B-PER", "I-PER"],
    ["B-LOC", "E-LOC", "I-LOC", "S-LOC", "E-LOC"],  # E-/S- end entities
    ["S-ORG", "I-ORG", "E-ORG", "B-ORG", "E-ORG", "E-ORG"],
    ["I-MISC", "E-MISC", "B-MISC", "S-MISC", "I-PER", "B-PER"],
    ["E-PER", "I-PER", "O", "E-LOC", "B-LOC-X", "I-LOC-X"],  # types may contain "-"
    ["O", "O"],
    ["B-A", "I-A", "I-B", "E-B", "O", "B-A"],  # entity at the very end
]


@pytest.mark.parametrize("tags", TRICKY)
def test_entities_match_seqeval(tags):
  assert ner.get_entities(tags) == seqeval_entities(tags)


def _random_tags(rng, n_sentences, tag_set):
  return [list(rng.choice(tag_set, int(rng.integers(1, 12)))) for _ in range(n_sentences)]


def _check_against_seqeval(true, pred):
  ours = ner.compute(true, pred)
  theirs = seqeval.metrics.classification_report(true, pred, output_dict=True)
  for kind, row in theirs.items():
    if kind.endswith(" avg"):
      prefix = {"micro avg": "", "macro avg": "macro_", "weighted avg": "weighted_"}[kind]
      names = {f"{prefix}precision": "precision", f"{prefix}recall": "recall",
               f"{prefix}f1": "f1-score"}
    else:
      names = {f"{kind}/{key}": key for key in ("precision", "recall", "support")}
      names[f"{kind}/f1"] = "f1-score"
    for ours_key, their_key in names.items():
      assert ours[ours_key] == pytest.approx(row[their_key], abs=1e-12), (ours_key, true, pred)
  for average in ("micro", "macro", "weighted"):
    prefix = "" if average == "micro" else f"{average}_"
    for metric in ("precision", "recall", "f1"):
      theirs_value = getattr(seqeval.metrics, f"{metric}_score")(true, pred, average=average)
      assert ours[prefix + metric] == pytest.approx(theirs_value, abs=1e-12)
  for digits in (2, 4):
    assert ner.report(true, pred, digits) == seqeval.metrics.classification_report(
        true, pred, digits=digits)


def test_ner_scores_match_seqeval_on_tricky_cases():
  pred = [list(reversed(t)) for t in TRICKY]
  _check_against_seqeval(TRICKY, pred)
  _check_against_seqeval(TRICKY, TRICKY)


@pytest.mark.parametrize("seed", range(4))
def test_ner_scores_match_seqeval_on_random_sequences(seed):
  rng = np.random.default_rng(seed)
  tag_set = ["O", "O", "O"] + [f"{p}-{t}" for p in "BIES"[:2 + 2 * (seed % 2)]
                                for t in ("PER", "LOC", "ORG")]
  true = _random_tags(rng, 40, tag_set)
  pred = [[t if rng.random() < 0.7 else str(rng.choice(tag_set)) for t in s] for s in true]
  _check_against_seqeval(true, pred)


def test_ner_errors_and_empty_input():
  with pytest.raises(ValueError, match="unsupported tag 'U-PER'"):
    ner.compute([["U-PER"]], [["O"]])
  with pytest.raises(ValueError, match="sentence 0"):
    ner.compute([["O", "O"]], [["O"]])
  out = ner.compute([["O"]], [["O"]])
  assert out["f1"] == 0.0 and out["macro_f1"] == 0.0  # seqeval: 0 when nothing to find
  assert "micro avg" in ner.report([["O"]], [["O"]])


# SQuAD.

def _dataset(*answer_lists, impossible=False):
  qas = [{"id": f"q{i}", "question": "?", "answers": [{"text": t, "answer_start": 0} for t in a],
          **({"is_impossible": not a} if impossible else {})}
         for i, a in enumerate(answer_lists)]
  return {"version": "x", "data": [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]}


def test_squad_normalization_and_token_f1():
  assert squad.normalize_answer("  The  Denver-Broncos, an A-team!") == "denverbroncos ateam"
  assert squad.normalize_answer("Theory of an anthem") == "theory of anthem"  # whole words only
  assert squad.exact_match("the Denver Broncos", "Denver Broncos.") == 1.0
  assert squad.f1("Broncos", "Denver Broncos") == pytest.approx(2 / 3)  # p 1, r 1/2
  assert squad.f1("Denver Broncos won", "the Broncos") == pytest.approx(0.5)  # p 1/3, r 1
  assert squad.f1("a a b", "a b b") == pytest.approx(2 / 3)  # articles go: "b" vs "b b"
  assert squad.f1("x x y", "x y y") == pytest.approx(2 / 3)  # bag overlap: one x, one y
  assert squad.f1("Denver-Broncos", "Denver Broncos") == 0.0


def test_squad_v1_scores_max_over_gold_answers():
  data = _dataset(["Denver Broncos", "Broncos"], ["Santa Clara, California"], ["1996"], ["the"])
  predictions = {"q0": "Denver", "q1": "Santa Clara", "q2": "in 1996", "q3": "The"}
  out = squad.compute(predictions, data)
  # q0: EM 0, F1 max(2/3, 0); q1: EM 0, F1 0.8; q2: EM 0, F1 2/3; q3: EM 1, but v1.1 F1 0.
  assert out["exact_match"] == pytest.approx(25.0)
  assert out["f1"] == pytest.approx(100 * (2 / 3 + 0.8 + 2 / 3 + 0) / 4)
  assert out["total"] == 4 and out["missing"] == 0
  out = squad.compute({"q0": "Broncos"}, data)
  assert out["exact_match"] == 25.0 and out["missing"] == 3  # missing ones score 0


def test_squad_v2_no_answer_rules():
  data = _dataset(["Denver Broncos"], [], ["the"], [], impossible=True)
  predictions = {"q0": "", "q1": "", "q2": "The", "q3": "something"}
  out = squad.compute(predictions, data)
  # q0: empty vs a real answer -> 0/0; q1: no-answer matched -> 1/1; q2: gold "the" normalises
  # to nothing, so it is a no-answer question that "The" (empty too) matches -> 1/1; q3: 0/0.
  assert out["exact_match"] == 50.0 and out["f1"] == 50.0
  assert out["has_ans_total"] == 1 and out["has_ans_exact_match"] == 0.0
  assert out["no_ans_total"] == 3 and out["no_ans_f1"] == pytest.approx(200 / 3)
  with pytest.raises(ValueError, match="'q1' has no gold answer"):
    squad.compute(predictions, data, version_2=False)
