"""Shared helpers for the pretraining-data tests: random-word corpora and unmasked batches."""

import numpy as np


def random_documents(rng: np.random.Generator, num_docs: int, *, vocabulary: int = 400,
                     max_lines: int = 8, max_words: int = 25) -> list[str]:
  """`num_docs` documents of 1..max_lines-1 lines of random made-up words."""
  words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(2, 9)))
           for _ in range(vocabulary)]
  return ["\n".join(" ".join(rng.choice(words, size=rng.integers(3, max_words)))
                    for _ in range(rng.integers(1, max_lines))) for _ in range(num_docs)]


def unmasked(batch: dict[str, np.ndarray]) -> np.ndarray:
  """int32 [B, T]: the packed examples behind a masked batch (a row identifies its example)."""
  tokens = batch["input_ids"].copy()
  for row, positions, ids, weights in zip(tokens, batch["masked_positions"], batch["masked_ids"],
                                          batch["masked_weights"]):
    row[positions[weights > 0]] = ids[weights > 0]
  return tokens


def write_corpus_files(folder, seed: int, docs_per_file: int, files: int = 4) -> str:
  """`files` text files of random-word documents in `folder` (a pathlib.Path); their glob."""
  rng = np.random.default_rng(seed)
  for k in range(files):
    docs = random_documents(rng, docs_per_file, vocabulary=300, max_lines=6, max_words=20)
    (folder / f"part-{k}.txt").write_text("\n\n".join(docs) + "\n")
  return str(folder / "*.txt")
