"""Trains a BERT WordPiece vocabulary and saves vocab.txt + tokenizer.json.

  python -m jaxfm.tokenizer train --input='data/*.txt.gz' --out=/tmp/tok --vocab_size=30522
  python -m jaxfm.tokenizer train --out=/tmp/tok  # on the embedded default corpus

`--input` takes the same comma-separated globs (local or gs://) as `data.train_files`.
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app, flags

from jaxfm.data.corpus import CorpusCounters, CorpusSpec, read_documents
from jaxfm.data.tokenizer import train_tokenizer

_INPUT = flags.DEFINE_string("input", "", "Comma-separated globs; '' = the default corpus.")
_OUT = flags.DEFINE_string("out", None, "Folder to write vocab.txt and tokenizer.json to.",
                           required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Vocabulary size, special tokens included.")
_CASED = flags.DEFINE_bool("cased", False, "Keep case and accents (default: lowercase).")
_FORMAT = flags.DEFINE_enum("format", "text", ["text", "jsonl"], "Input file format.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL field holding the text.")
_DOCUMENTS = flags.DEFINE_enum("documents", "blank_line", ["blank_line", "line"],
                               "How documents are separated in text files.")
_ON_DECODE_ERROR = flags.DEFINE_enum("on_decode_error", "error", ["error", "skip", "replace"],
                                     "What to do with invalid UTF-8 lines.")


def main(argv: Sequence[str]) -> None:
  if list(argv[1:]) != ["train"]:
    raise app.UsageError("usage: python -m jaxfm.tokenizer train --out=DIR [--input=GLOB] ...")
  spec = CorpusSpec(train_files=_INPUT.value, format=_FORMAT.value, text_field=_TEXT_FIELD.value,
                    documents=_DOCUMENTS.value, on_decode_error=_ON_DECODE_ERROR.value)
  counters = CorpusCounters()
  texts = [segment for doc in read_documents(spec, counters) for segment in doc]
  tokenizer = train_tokenizer(texts, vocab_size=_VOCAB_SIZE.value, lowercase=not _CASED.value)
  tokenizer.save(_OUT.value)
  print(f"Wrote a {tokenizer.vocab_size}-token vocabulary to {_OUT.value} "
        f"({counters.documents} documents, {counters.text_lines} text lines)")


if __name__ == "__main__":
  app.run(main)
