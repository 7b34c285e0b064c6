"""Entity-level NER metrics with seqeval's default (conlleval-style, non-strict) chunking.

Tags are "O" or a prefix B-/I-/E-/S- plus an entity type. A non-O token continues the open
entity iff its prefix is I or E, the previous token's prefix is B or I, and the types agree;
any other non-O token opens a new entity, and O closes it. So an I- after O (or after another
type) starts an entity, a type change splits one, and E-/S- end one. An entity counts as
correct only if its type, first and last token all match a gold entity.
"""

from __future__ import annotations

from typing import Sequence

Entity = tuple[str, int, int]  # (type, first token, last token), inclusive
_KEYS = ("precision", "recall", "f1")


def _split_tag(tag: str) -> tuple[str, str]:
  """("B", "PER") for "B-PER"; ("O", "") for "O"."""
  if tag == "O":
    return "O", ""
  if len(tag) < 3 or tag[0] not in "BIES" or tag[1] != "-":
    raise ValueError(f"unsupported tag {tag!r}: expected 'O' or B-/I-/E-/S- plus a type")
  return tag[0], tag[2:]


def get_entities(tags: Sequence[str]) -> list[Entity]:
  """The entities of one tag sequence, in order."""
  entities = []
  prev_prefix, prev_kind = "O", ""
  for i, tag in enumerate(tags):
    prefix, kind = _split_tag(tag)
    if prefix in ("I", "E") and prev_prefix in ("B", "I") and kind == prev_kind:
      entities[-1] = (kind, entities[-1][1], i)
    elif prefix != "O":
      entities.append((kind, i, i))
    prev_prefix, prev_kind = prefix, kind
  return entities


def _prf(correct: int, predicted: int, true: int) -> tuple[float, float, float]:
  """Precision, recall and F1; each 0 where its denominator is 0."""
  precision = correct / predicted if predicted else 0.0
  recall = correct / true if true else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return precision, recall, f1


def _scores(true_tag_seqs: Sequence[Sequence[str]], pred_tag_seqs: Sequence[Sequence[str]]
            ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
  """({type: row}, {average: row}), each row {"precision", "recall", "f1", "support"}."""
  if len(true_tag_seqs) != len(pred_tag_seqs):
    raise ValueError(f"{len(true_tag_seqs)} true vs {len(pred_tag_seqs)} predicted sentences")
  counts: dict[str, list[int]] = {}  # type -> [correct, predicted, true]
  for i, (true_tags, pred_tags) in enumerate(zip(true_tag_seqs, pred_tag_seqs)):
    if len(true_tags) != len(pred_tags):
      raise ValueError(f"sentence {i}: {len(true_tags)} true vs {len(pred_tags)} predicted tags")
    true, pred = set(get_entities(true_tags)), set(get_entities(pred_tags))
    for column, entities in enumerate((true & pred, pred, true)):
      for kind, _, _ in entities:
        counts.setdefault(kind, [0, 0, 0])[column] += 1

  def row(correct: int, predicted: int, true: int) -> dict[str, float]:
    return dict(zip(_KEYS, _prf(correct, predicted, true)), support=true)

  per_type = {kind: row(*counts[kind]) for kind in sorted(counts)}
  micro = row(*(sum(c[j] for c in counts.values()) for j in range(3)))
  support = micro["support"]
  macro = {key: sum(r[key] for r in per_type.values()) / len(per_type) if per_type else 0.0
           for key in _KEYS}
  weighted = {key: sum(r[key] * r["support"] for r in per_type.values()) / support
              if support else 0.0 for key in _KEYS}
  averages = {"micro avg": micro, "macro avg": {**macro, "support": support},
              "weighted avg": {**weighted, "support": support}}
  return per_type, averages


def compute(true_tag_seqs: Sequence[Sequence[str]],
            pred_tag_seqs: Sequence[Sequence[str]]) -> dict[str, float]:
  """Entity-level scores of predicted vs true tag sequences (one per sentence).

  Returns:
    "precision", "recall", "f1" (micro averages); "macro_*" and "weighted_*" (by support)
    averages over entity types; per type "<TYPE>/precision", "<TYPE>/recall", "<TYPE>/f1" and
    "<TYPE>/support" (the number of true entities).
  """
  per_type, averages = _scores(true_tag_seqs, pred_tag_seqs)
  metrics = {}
  for prefix, name in (("", "micro avg"), ("macro_", "macro avg"), ("weighted_", "weighted avg")):
    metrics.update({f"{prefix}{key}": float(averages[name][key]) for key in _KEYS})
  for kind, row in per_type.items():
    metrics.update({f"{kind}/{key}": float(value) for key, value in row.items()})
  return metrics


def report(true_tag_seqs: Sequence[Sequence[str]], pred_tag_seqs: Sequence[Sequence[str]],
           digits: int = 2) -> str:
  """A text table of per-type and averaged scores, laid out like seqeval's classification_report."""
  per_type, averages = _scores(true_tag_seqs, pred_tag_seqs)
  width = max([len(name) for name in (*per_type, *averages)] + [digits])

  def line(name: str, row: dict[str, float]) -> str:
    scores = "".join(f" {row[key]:>9.{digits}f}" for key in _KEYS)
    return f"{name:>{width}} {scores} {row['support']:>9}"

  header = " " * width + " " + "".join(
      f" {title:>9}" for title in ("precision", "recall", "f1-score", "support"))
  lines = [header, "", *(line(k, r) for k, r in per_type.items()), "",
           *(line(k, r) for k, r in averages.items())]
  return "\n".join(lines) + "\n"
