"""SQuAD exact match and F1, as the official v1.1 and v2.0 evaluation scripts define them.

Answers are compared after normalisation: lowercase, drop ASCII punctuation, drop the articles
a/an/the, collapse whitespace. F1 is over the bag of normalised tokens. A question scores the
best value over its gold answers. In v2.0 the gold answers that normalise to nothing are
dropped; a question left with none is a no-answer question, which only the empty prediction
matches (EM 1, F1 1), and an empty prediction scores 0 against a real answer.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Any, Mapping

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
  """Lowercase, remove punctuation, remove articles, collapse whitespace (in that order)."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
  """1.0 if the normalised strings are equal, else 0.0."""
  return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str, version_2: bool = False) -> float:
  """Token-bag F1 of the normalised strings.

  When either side normalises to no tokens, v1.1 scores 0 and v2.0 scores 1 if both are empty.
  """
  pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
  if version_2 and not (pred_tokens and gold_tokens):
    return float(pred_tokens == gold_tokens)
  common = sum((collections.Counter(pred_tokens) & collections.Counter(gold_tokens)).values())
  if common == 0:
    return 0.0
  precision, recall = common / len(pred_tokens), common / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


def compute(predictions: Mapping[str, str], dataset: Any,
            version_2: bool | None = None) -> dict[str, float]:
  """Scores predicted answer strings against a SQuAD dataset.

  Args:
    predictions: question id -> predicted answer text ("" for no answer).
    dataset: the parsed SQuAD JSON, or its "data" list of articles.
    version_2: apply the v2.0 rules; None infers it from "is_impossible" fields.

  Returns:
    "exact_match" and "f1" in percent over all questions, "total", and "missing" (questions
    without a prediction, scored 0 like the v1.1 script does; v2.0's script would drop them).
    With v2.0 also "has_ans_*" and "no_ans_*" scores and totals for the two subsets.
  """
  articles = dataset["data"] if isinstance(dataset, Mapping) else dataset
  questions = [qa for article in articles for paragraph in article["paragraphs"]
               for qa in paragraph["qas"]]
  if version_2 is None:
    version_2 = any("is_impossible" in qa for qa in questions)
  scores = {"": [], "has_ans_": [], "no_ans_": []}  # subset -> [(exact, f1)]
  missing = 0
  for qa in questions:
    golds = [answer["text"] for answer in qa["answers"]]
    if version_2:
      golds = [gold for gold in golds if normalize_answer(gold)] or [""]
    elif not golds:
      raise ValueError(f"question {qa['id']!r} has no gold answer: score it with version_2=True")
    if qa["id"] in predictions:
      prediction = predictions[qa["id"]]
      score = (max(exact_match(prediction, gold) for gold in golds),
               max(f1(prediction, gold, version_2) for gold in golds))
    else:
      missing += 1
      score = (0.0, 0.0)
    scores[""].append(score)
    if version_2:
      scores["has_ans_" if golds != [""] else "no_ans_"].append(score)
  metrics = {"total": float(len(questions)), "missing": float(missing)}
  for subset, values in scores.items():
    if values or not subset:
      metrics[f"{subset}exact_match"] = 100 * sum(v[0] for v in values) / max(len(values), 1)
      metrics[f"{subset}f1"] = 100 * sum(v[1] for v in values) / max(len(values), 1)
      if subset:
        metrics[f"{subset}total"] = float(len(values))
  return metrics
