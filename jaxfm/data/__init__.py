"""Input pipelines (floor 1: imports neither models nor train).

MLM pretraining: `corpus` (text/JSONL/tfds readers) and `default_corpus` (the embedded
stdlib-docstring corpus) -> `tokenizer` (WordPiece load/train/save) -> `pretraining`
(packing into a numpy store, dynamic masking) -> `mlm_data` (the entry point
`mlm_data.build_pretraining_data` and its iterators), over `loader` (host layout, grain
iterators, padded eval passes; fine-tuning's too). `prepared` writes the packed shards to
ArrayRecord files once (`jaxfm.prepare`) and reads them back by index. Submodules are imported explicitly, so
importing one never pulls in grain or tensorflow_datasets.
"""
