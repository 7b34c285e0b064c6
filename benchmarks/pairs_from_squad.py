r"""A sentence-pair classification set from a SQuAD v1.1 file, built the way GLUE built QNLI.

  python -m benchmarks.pairs_from_squad --squad=XQUAD_EN/xquad_en_part1.json --out=DIR \
      [--dev_articles=4]

Each question is paired with every sentence of its paragraph; the label is 1 for the sentence
that holds the answer, else 0 (Wang et al., 2018, GLUE's QNLI from SQuAD, without its
lexical-overlap filter). The last `--dev_articles` articles give `dev.tsv`, the others
`train.tsv`, so no paragraph is in both. Files: TSV with the header `question<TAB>sentence<TAB>label`
(`--config.data.text_fields=question,sentence`). A question whose answer crosses a sentence
boundary is skipped and counted. Prints one JSON line of counts.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Iterator

from absl import app, flags

_SQUAD = flags.DEFINE_string("squad", None, "A SQuAD v1.1 JSON file.")
_OUT = flags.DEFINE_string("out", None, "Folder for train.tsv and dev.tsv.")
_DEV_ARTICLES = flags.DEFINE_integer("dev_articles", 4, "The last N articles make the dev set.")
flags.mark_flags_as_required(["squad", "out"])

# A sentence ends at . ! or ? (optionally closed by a quote or bracket) before whitespace and
# an upper-case letter, a digit or an opening quote: a plain rule ("St. Louis" splits too).
_SENTENCE_END = re.compile(r"(?<=[.!?])([\"')\]]?)\s+(?=[A-Z0-9\"'(])")


def sentence_spans(text: str) -> list[tuple[int, int]]:
  """[start, end) character spans of `text`'s sentences, in order, without the whitespace
  between them."""
  spans, start = [], 0
  for match in _SENTENCE_END.finditer(text):
    spans.append((start, match.start() + len(match.group(1))))
    start = match.end()
  spans.append((start, len(text.rstrip())))
  return [(s, e) for s, e in spans if e > s]


def pairs(article: dict[str, Any], skipped: list[str]) -> Iterator[tuple[str, str, int]]:
  """(question, sentence, label) for every question of `article` and sentence of its
  paragraph; the ids of questions whose answer crosses a sentence boundary go to `skipped`."""
  for paragraph in article["paragraphs"]:
    context = paragraph["context"]
    spans = sentence_spans(context)
    for qa in paragraph["qas"]:
      answer = qa["answers"][0]
      start, end = answer["answer_start"], answer["answer_start"] + len(answer["text"])
      holding = [i for i, (s, e) in enumerate(spans) if s <= start and end <= e]
      if not holding:
        skipped.append(qa["id"])
        continue
      for i, (s, e) in enumerate(spans):
        yield qa["question"].strip(), context[s:e], int(i == holding[0])


def _clean(text: str) -> str:
  return " ".join(text.split())  # no tabs or newlines inside a TSV field


def main(argv):
  del argv
  articles = json.loads(pathlib.Path(_SQUAD.value).read_text(encoding="utf-8"))["data"]
  if not 0 < _DEV_ARTICLES.value < len(articles):
    raise app.UsageError(f"--dev_articles must be in 1..{len(articles) - 1}")
  out = pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  cut = len(articles) - _DEV_ARTICLES.value
  counts, skipped = {}, []
  for split, chosen in (("train", articles[:cut]), ("dev", articles[cut:])):
    rows = [row for article in chosen for row in pairs(article, skipped)]
    lines = ["question\tsentence\tlabel"]
    lines += [f"{_clean(q)}\t{_clean(s)}\t{label}" for q, s, label in rows]
    (out / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts[split] = {"pairs": len(rows), "positive": sum(label for *_, label in rows)}
  print(json.dumps({**counts, "skipped_questions": len(skipped)}))


if __name__ == "__main__":
  app.run(main)
