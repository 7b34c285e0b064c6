"""Input pipelines (floor 1: imports neither models nor train).

MLM pretraining: `corpus` (text/JSONL/tfds readers) and `default_corpus` (the embedded
stdlib-docstring corpus) -> `tokenizer` (WordPiece load/train/save) -> `pretraining`
(packing into a numpy store, dynamic masking) -> `loader` (grain iterators and the entry
point `loader.build_pretraining_data`). Submodules are imported explicitly, so importing one
never pulls in grain or tensorflow_datasets.
"""
