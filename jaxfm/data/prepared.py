"""A corpus tokenised and packed once, then read back by index: `prepare` (behind
`python -m jaxfm.prepare`) writes it, `load_prepared` gives the `MlmData` a run with
`data.prepared=DIR` trains from.

The examples are the online path's: the same shards, held-out split, tokenizer (trained on
shard 0 unless configured) and packing seeds (`mlm_data.read_splits`, `mlm_data.pack_splits`),
so a run gives the same batches and masks from DIR as from the corpus, and its start-up reads
no text. Masking stays at training time, a function of (seed, epoch, example id).

Why ArrayRecord: grain reads it natively with random access by record index (its
`ArrayRecordDataSource`), each file carries its own index and block checksums, and a reader
opens a file by path, so grain's workers open the shards themselves instead of receiving
them pickled. TFRecord has no index; Parquet or Arrow would bring a columnar reader to
fixed-size rows.

DIR holds
  tokenizer/                        the run's tokenizer (vocab.txt, tokenizer.json)
  settings.json                     what the examples depend on; a resumed prepare must match
  {train,eval}-VVVVV-of-SSSSS.arrayrecord  one fixed-size record per example of shard V, its
                                    sources' examples back to back (`mlm_data.Mixture`)
  shard-VVVVV-of-SSSSS.json         shard V is finished: its files' counts and checksums
  manifest.json                     written last; from then on DIR is immutable

Each file appears whole or not at all (written as `.tmp`, then renamed); a rerun skips the
finished shards, and with a manifest present only verifies. `prepare(workers=N)` prepares N
shards at a time in worker processes; `prepare(shards=...)` lets each host of a parallel
preparation take its own shards, and whichever host finishes the last one writes the manifest.
The files do not depend on who wrote them.

Integrity. Each file's manifest entry has its size, record count, the crc32 of the whole file
and the crc32 of its last 64 KiB (where ArrayRecord keeps its record index and footer). A run
checks the cheap ones for every file at start-up: size, record count and tail crc32 cost one
small read per file whatever the corpus size, and catch a truncated, replaced or half-copied
file; damage inside the records is caught when they are read, by the hashes riegeli keeps
per chunk, as an error naming the file. `prepare` on a finished DIR checks every byte (the
whole-file crc32), and so does a run with `data.skip_bad_shards=True`, which must know every
bad shard before its first step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import tempfile
import time
import zlib
from collections.abc import Collection, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from etils import epath

from jaxfm.data import mlm_data
from jaxfm.data.corpus import CorpusCounters, CorpusSpec, expand_globs
from jaxfm.data.pretraining import ExampleStore, PackingStats
from jaxfm.data.tokenizer import WordPieceTokenizer, has_tokenizer, load_tokenizer

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
TOKENIZER_DIR = "tokenizer"
# Groups of a few uncompressed records: a random read decodes little beside its record.
_WRITER_OPTIONS = "group_size:16,uncompressed"
_RANDOM_ACCESS = "readahead_buffer_size:0,max_parallelism:0"
_CRC_BLOCK = 1 << 22  # bytes read at a time when checksumming a whole file
_TAIL = 1 << 16  # the bytes at a file's end whose crc32 the start-up check compares
# `cfg.data` fields the packed examples depend on; a run from DIR must have the same.
PACKING_FIELDS = ("max_seq_length", "eval_fraction", "seed", "num_shards", "lowercase",
                  "word_segmenter", "word_segmenter_dict")  # the last two: word marks in tokens
# Where the documents and the vocabulary come from; a resumed prepare must have the same.
SOURCE_FIELDS = ("train_files", "sources", "format", "text_field", "documents", "tfds_name",
                 "tfds_data_dir", "on_decode_error", "tokenizer", "vocab_size")
SPLITS = mlm_data.SPLITS


class PreparedError(ValueError):
  """A prepared directory is missing, unfinished or damaged; the message names the file."""


class SettingsMismatch(PreparedError):
  """The config asks for other examples than the prepared directory holds."""

  def __init__(self, field: str, prepared: Any, current: Any, where: epath.Path):
    self.field = field
    super().__init__(f"{field}={current!r} but {where} was prepared with {field}={prepared!r}")


def settings(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """'data.<field>' -> value of the fields the prepared examples depend on (of `data.sources`,
  the names and files: the weights only steer sampling, so a run may change them)."""
  out = {f"data.{k}": data_cfg[k] for k in PACKING_FIELDS + SOURCE_FIELDS}
  out["data.sources"] = [[source[0], source[1]] for source in data_cfg.sources]
  return out


def tokenizer_sha256(tokenizer: WordPieceTokenizer) -> str:
  """A digest of the whole tokenizer pipeline (vocabulary, normaliser), stable across save/load."""
  return hashlib.sha256(tokenizer.to_json().encode("utf-8")).hexdigest()


def record_dtype(max_seq_length: int, vocab_size: int) -> np.dtype:
  """One example: tokens [T] (uint16 when every id fits, else int32), length, b_start."""
  tokens = "<u2" if vocab_size <= 1 << 16 else "<i4"
  return np.dtype([("tokens", tokens, (max_seq_length,)), ("length", "<i4"), ("b_start", "<i4")])


def _shard_name(shard: int, num_shards: int) -> str:
  return f"{shard:05d}-of-{num_shards:05d}"


def split_file(split: str, shard: int, num_shards: int) -> str:
  """The file name of `split` of `shard`."""
  return f"{split}-{_shard_name(shard, num_shards)}.arrayrecord"


def _write_json(path: epath.Path, value: Any) -> None:
  """Writes `value` as JSON to `path` atomically (a `.tmp`, then a rename)."""
  partial = path.parent / (path.name + ".tmp")
  partial.write_text(json.dumps(value, indent=1, sort_keys=True) + "\n")
  partial.replace(path)


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise PreparedError(f"{path}: unreadable: {e}") from e


def _check_same(prepared: dict[str, Any], current: dict[str, Any], fields: Sequence[str],
                where: epath.Path) -> None:
  """Raises `SettingsMismatch` naming the first of `fields` that differs."""
  for field in fields:
    if prepared.get(field) != current.get(field):
      raise SettingsMismatch(field, prepared.get(field), current.get(field), where)


def file_crc32(path: epath.Path, start: int = 0) -> int:
  """The crc32 of the bytes of `path` from offset `start` on."""
  crc = 0
  with path.open("rb") as f:
    f.seek(start)
    while block := f.read(_CRC_BLOCK):
      crc = zlib.crc32(block, crc)
  return crc


def _tail_start(size: int) -> int:
  return max(0, size - _TAIL)


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _write_split(path: epath.Path, store: ExampleStore, dtype: np.dtype) -> dict[str, Any]:
  """Writes `store` as one record per example; returns the file's manifest entry.

  ArrayRecord writes local files only: a `gs://` file is written to a local temporary folder,
  checksummed there and uploaded (an object appears whole).
  """
  records = np.empty(len(store), dtype)  # [N]
  records["tokens"], records["length"], records["b_start"] = (store.tokens, store.lengths,
                                                              store.b_starts)
  raw = records.tobytes()
  with tempfile.TemporaryDirectory(prefix="jaxfm-prepare-") as scratch:
    local = (path.parent / (path.name + ".tmp") if _is_local(path)
             else epath.Path(scratch) / path.name)
    writer = ArrayRecordWriter(str(local), _WRITER_OPTIONS)
    for i in range(len(records)):
      writer.write(raw[i * dtype.itemsize:(i + 1) * dtype.itemsize])
    writer.close()
    size = local.stat().length
    entry = {"file": path.name, "examples": len(store), "bytes": size,
             "crc32": file_crc32(local), "tail_crc32": file_crc32(local, _tail_start(size))}
    if _is_local(path):
      local.replace(path)
    else:
      local.copy(path, overwrite=True)
  return entry


def _prepare_shard(data_cfg: ml_collections.ConfigDict, out: epath.Path, shard: int,
                   tokenizer: WordPieceTokenizer, dtype: np.dtype,
                   read: tuple[mlm_data.SplitDocs, CorpusCounters] | None) -> dict[str, Any]:
  """Reads (unless `read` holds its documents), packs and writes one shard, then its entry."""
  splits, corpus = read or (None, CorpusCounters())
  splits = splits or mlm_data.read_splits(data_cfg, [shard], corpus)
  stats = {split: PackingStats() for split in SPLITS}
  packed = mlm_data.pack_splits(splits, tokenizer, data_cfg, stats, corpus)
  stores = {split: mlm_data.shard_store(packed[split][shard], data_cfg.max_seq_length)
            for split in SPLITS}
  entry = {"shard": shard, "corpus": corpus.as_dict(),
           "tokens_crc32": mlm_data.tokens_crc32(stores["train"]),
           "sources": [len(store) for store in packed["train"][shard]]}
  for split in SPLITS:
    path = out / split_file(split, shard, data_cfg.num_shards)
    entry[split] = {**_write_split(path, stores[split], dtype),
                    "packing": stats[split].as_dict()}
  _write_json(out / f"shard-{_shard_name(shard, data_cfg.num_shards)}.json", entry)
  logging.info("Prepared shard %d: %d train, %d eval examples", shard,
               entry["train"]["examples"], entry["eval"]["examples"])
  return entry


def _prepare_in_worker(data: dict[str, Any], out: str, shard: int) -> int:
  """`_prepare_shard` in a worker process of `prepare(workers=N)`: DIR's tokenizer, one core
  (the tokenizer's own threads off, as N workers share the cores)."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  data_cfg = ml_collections.ConfigDict(data)
  tokenizer = load_tokenizer(epath.Path(out) / TOKENIZER_DIR, lowercase=data_cfg.lowercase)
  dtype = record_dtype(data_cfg.max_seq_length, tokenizer.vocab_size)
  _prepare_shard(data_cfg, epath.Path(out), shard, tokenizer, dtype, None)
  return shard


def _finished(out: epath.Path, shard: int, num_shards: int) -> dict[str, Any] | None:
  """The entry of a finished shard (its record and both files present), else None."""
  record = out / f"shard-{_shard_name(shard, num_shards)}.json"
  if not record.exists():
    return None
  entry = _read_json(record)
  return entry if all((out / entry[split]["file"]).exists() for split in SPLITS) else None


def _tokenizer(data_cfg: ml_collections.ConfigDict, out: epath.Path, trains: bool,
               wait_s: float) -> tuple[WordPieceTokenizer, tuple | None]:
  """DIR's tokenizer, chosen as the online path chooses (configured, else trained on shard 0's
  training documents, which are returned as read to spare reading them twice). A host that
  does not prepare shard 0 (`trains` False) waits up to `wait_s` for the one that does."""
  folder = out / TOKENIZER_DIR
  read = None
  if not data_cfg.tokenizer and not has_tokenizer(folder):
    if trains:
      corpus = CorpusCounters()
      read = mlm_data.read_splits(data_cfg, [0], corpus), corpus
    else:
      deadline = time.monotonic() + wait_s
      logging.info("Waiting up to %.0f s for the host preparing shard 0 to save %s", wait_s,
                   folder)
      while not has_tokenizer(folder):
        if time.monotonic() > deadline:
          raise PreparedError(f"no tokenizer in {folder} after {wait_s:.0f} s: the host that "
                              "prepares shard 0 trains it (or set data.tokenizer)")
        time.sleep(min(5.0, wait_s / 10))
  tokenizer = mlm_data.run_tokenizer(data_cfg, str(folder),
                                     read and mlm_data.shard0_documents(read[0]), save=True)
  saved = load_tokenizer(folder, lowercase=data_cfg.lowercase)
  if tokenizer_sha256(saved) != tokenizer_sha256(tokenizer):
    raise SettingsMismatch("data.tokenizer", f"the tokenizer in {folder}", data_cfg.tokenizer,
                           out)
  return saved, read


def _sources(data_cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """Each source's name, weight and files with their sizes (a tfds or the embedded corpus:
  its name)."""
  spec = CorpusSpec.from_config(data_cfg)
  out = []
  for source in mlm_data.sources_of(data_cfg):
    if spec.format == "tfds":
      files = [{"path": f"tfds:{spec.tfds_name}", "bytes": None}]
    elif not source.files:
      files = [{"path": "the embedded default corpus", "bytes": None}]
    else:
      files = [{"path": str(p), "bytes": p.stat().length} for p in expand_globs(source.files)]
    out.append({"name": source.name, "weight": source.weight, "files": files})
  return out


def prepare(data_cfg: ml_collections.ConfigDict, out: str, shards: Sequence[int] | None = None,
            *, workers: int = 0, tokenizer_wait_s: float = 3600.0) -> dict[str, Any] | None:
  """Writes the shards `shards` (default: all) of the corpus of `data_cfg` to `out`, skipping
  finished ones, then the manifest once every shard is finished (returned; else None).

  With a manifest present, checks it against `data_cfg` and every byte of every file instead.

  Args:
    data_cfg: the `cfg.data` section.
    out: DIR, local or `gs://`.
    shards: this host's shards; the host with shard 0 trains the tokenizer (unless one is
      configured), the others wait for it up to `tokenizer_wait_s` seconds.
    workers: shards prepared at a time in worker processes (0 or 1: here, one at a time).

  Raises:
    SettingsMismatch: `out` was (partly) prepared from another config; names the field.
    PreparedError: a damaged file (named); CorpusError, TokenizerError: as the online path.
  """
  out = epath.Path(out)
  if (out / MANIFEST).exists():
    manifest = read_manifest(out)
    _check_same(manifest["settings"], settings(data_cfg), list(settings(data_cfg)), out / MANIFEST)
    verify(out, manifest)
    return manifest
  out.mkdir(parents=True, exist_ok=True)
  if (out / SETTINGS).exists():
    _check_same(_read_json(out / SETTINGS), settings(data_cfg), list(settings(data_cfg)),
                out / SETTINGS)
  else:
    _write_json(out / SETTINGS, settings(data_cfg))
  num_shards = data_cfg.num_shards
  mine = list(range(num_shards) if shards is None else shards)
  tokenizer, read = _tokenizer(data_cfg, out, 0 in mine, tokenizer_wait_s)
  dtype = record_dtype(data_cfg.max_seq_length, tokenizer.vocab_size)
  todo = [v for v in mine if _finished(out, v, num_shards) is None]
  if workers > 1 and len(todo) > 1:
    with multiprocessing.get_context("spawn").Pool(min(workers, len(todo))) as pool:
      done = pool.starmap_async(_prepare_in_worker,
                                [(data_cfg.to_dict(), str(out), v) for v in todo], chunksize=1)
      done.get()
  else:
    for v in todo:
      _prepare_shard(data_cfg, out, v, tokenizer, dtype, read if v == 0 else None)
  entries = [_finished(out, v, num_shards) for v in range(num_shards)]
  if any(entry is None for entry in entries):
    return None
  manifest = {"format_version": FORMAT_VERSION, "settings": settings(data_cfg),
              "tokenizer": {"sha256": tokenizer_sha256(tokenizer),
                            "vocab_size": tokenizer.vocab_size,
                            "trained": not data_cfg.tokenizer},
              "record": {"token_dtype": dtype["tokens"].base.name,
                         "max_seq_length": data_cfg.max_seq_length, "bytes": dtype.itemsize},
              "sources": _sources(data_cfg), "shards": entries}
  _write_json(out / MANIFEST, manifest)
  return manifest


def read_manifest(root: epath.Path) -> dict[str, Any]:
  """DIR's manifest.

  Raises:
    PreparedError: none (an unfinished prepare), unreadable, or of another format version.
  """
  path = root / MANIFEST
  if not path.exists():
    raise PreparedError(f"{path} does not exist: run python -m jaxfm.prepare --out={root} "
                        "(an unfinished preparation resumes)")
  manifest = _read_json(path)
  if manifest.get("format_version") != FORMAT_VERSION:
    raise PreparedError(f"{path}: format_version={manifest.get('format_version')!r}, this "
                        f"jaxfm reads {FORMAT_VERSION}; prepare the corpus again")
  return manifest


def check_file(path: epath.Path, entry: dict[str, Any], full: bool = False) -> None:
  """Checks a shard file against its manifest entry: present, its size, its record count and
  the crc32 of its tail (with `full`, of every byte).

  Raises:
    PreparedError: naming the file and what is wrong.
  """
  if not path.exists():
    raise PreparedError(f"shard file {path} is missing")
  if (size := path.stat().length) != entry["bytes"]:
    raise PreparedError(f"shard file {path} has {size} bytes, the manifest says "
                        f"{entry['bytes']} (truncated or replaced)")
  crc, want, what = ((file_crc32(path), entry["crc32"], "its bytes") if full else
                     (file_crc32(path, _tail_start(size)), entry["tail_crc32"], "its record index"))
  if crc != want:
    raise PreparedError(f"shard file {path}: crc32 {crc} of {what}, the manifest says {want} "
                        "(corrupt)")
  if _is_local(path):  # ArrayRecord reads local files only
    try:
      reader = ArrayRecordReader(str(path), _RANDOM_ACCESS)
    except RuntimeError as e:
      raise PreparedError(f"shard file {path}: unreadable: {e}") from e
    count = reader.num_records()
    reader.close()
    if count != entry["examples"]:
      raise PreparedError(f"shard file {path} holds {count} records, the manifest says "
                          f"{entry['examples']}")


def verify(root: epath.Path, manifest: dict[str, Any]) -> None:
  """Checks every byte of every file of `root` against the manifest.

  Raises:
    PreparedError: naming the first damaged file.
  """
  for entry in manifest["shards"]:
    for split in SPLITS:
      check_file(root / entry[split]["file"], entry[split], full=True)


@dataclasses.dataclass(eq=False)
class ShardFiles:
  """`mlm_data.ExampleRows` read by index from one split's files. Readers open lazily, in the
  process that reads (a grain worker too): pickling copies the paths only."""
  paths: dict[int, str]  # shard -> its file of this split
  dtype: np.dtype  # `record_dtype`
  _readers: dict[int, ArrayRecordReader] = dataclasses.field(default_factory=dict, init=False,
                                                             repr=False)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_readers": {}}

  def _reader(self, shard: int) -> ArrayRecordReader:
    if shard not in self._readers:
      try:
        self._readers[shard] = ArrayRecordReader(self.paths[shard], _RANDOM_ACCESS)
      except RuntimeError as e:
        raise PreparedError(f"shard file {self.paths[shard]}: unreadable: {e}") from e
    return self._readers[shard]

  def __call__(self, shards: np.ndarray, indices: np.ndarray) -> ExampleStore:
    records = np.empty(len(shards), self.dtype)  # [B]
    for v in np.unique(shards).tolist():
      here = shards == v
      try:
        raw = b"".join(self._reader(v).read(indices[here].tolist()))
        records[here] = np.frombuffer(raw, self.dtype)
      except (RuntimeError, ValueError) as e:
        raise PreparedError(f"shard file {self.paths[v]}: corrupt: {e}; python -m "
                            "jaxfm.prepare with the same --out checks every file") from e
    return ExampleStore(records["tokens"].astype(np.int32), records["length"].copy(),
                        records["b_start"].copy())


@dataclasses.dataclass(frozen=True, eq=False)
class PreparedData(mlm_data.MlmData):
  """`mlm_data.MlmData` whose examples are read from a prepared directory's files."""
  files: dict[str, dict[int, str]]  # split -> shard read here -> file
  dtype: np.dtype

  @property
  def shards_here(self) -> Collection[int]:
    return self.files["train"].keys()

  def rows(self, split: str) -> mlm_data.ExampleRows:
    return ShardFiles(self.files[split], self.dtype)


def _mixture(manifest: dict[str, Any], data_cfg: ml_collections.ConfigDict,
             root: epath.Path) -> mlm_data.Mixture:
  """DIR's sources with the run's weights (`data.sources`, which must name the same sources),
  else the weights DIR was prepared with."""
  names = [source["name"] for source in manifest["sources"]]
  if not data_cfg.sources:
    return mlm_data.Mixture(tuple(names), tuple(s["weight"] for s in manifest["sources"]))
  run = mlm_data.Mixture.of(mlm_data.sources_of(data_cfg))
  if list(run.names) != names:
    raise SettingsMismatch("data.sources", names, list(run.names), root / MANIFEST)
  return run


def check_run(manifest: dict[str, Any], data_cfg: ml_collections.ConfigDict,
              root: epath.Path) -> None:
  """Raises `SettingsMismatch` naming the first `cfg.data` field whose examples would differ
  from DIR's: the packing fields, and the tokenizer (its digest when `data.tokenizer` is
  set, else DIR's must have been trained with the same `data.vocab_size`)."""
  prepared, current = manifest["settings"], settings(data_cfg)
  fields = [f"data.{k}" for k in PACKING_FIELDS] + ([] if data_cfg.tokenizer else
                                                    ["data.tokenizer", "data.vocab_size"])
  _check_same(prepared, current, fields, root / MANIFEST)
  if data_cfg.tokenizer:
    configured = load_tokenizer(data_cfg.tokenizer, lowercase=data_cfg.lowercase)
    if tokenizer_sha256(configured) != manifest["tokenizer"]["sha256"]:
      raise SettingsMismatch("data.tokenizer", prepared["data.tokenizer"] or "a trained one",
                             data_cfg.tokenizer, root / MANIFEST)


def _cache(root: epath.Path, manifest: dict[str, Any]) -> epath.Path | None:
  """Where this host keeps local copies of a remote DIR's files (None for a local DIR): a folder
  of the system's temporary directory named by DIR and its manifest."""
  if _is_local(root):
    return None
  key = hashlib.sha256((str(root) + json.dumps(manifest["shards"], sort_keys=True)).encode())
  return epath.Path(tempfile.gettempdir()) / "jaxfm-prepared" / key.hexdigest()[:16]


def _local(root: epath.Path, cache: epath.Path | None, entry: dict[str, Any]) -> epath.Path:
  """Where a run reads DIR's file of `entry`: in DIR when DIR is local, else its copy in `cache`,
  downloaded once (ArrayRecord reads local files only).

  Raises:
    PreparedError: the remote file is missing.
  """
  if cache is None:
    return root / entry["file"]
  path = cache / entry["file"]
  if not (path.exists() and path.stat().length == entry["bytes"]):
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f"{entry['file']}.{os.getpid()}.tmp"
    try:
      (root / entry["file"]).copy(partial, overwrite=True)
    except FileNotFoundError as e:
      raise PreparedError(f"shard file {root / entry['file']} is missing") from e
    partial.replace(path)
    logging.info("Copied %s to %s", root / entry["file"], path)
  return path


def _bad_shards(root: epath.Path, cache: epath.Path | None, entries: list[dict[str, Any]],
                shards: Sequence[int], skip: bool) -> dict[int, str]:
  """Shard -> why, for the shards of `shards` whose files fail `check_file` (every byte when
  `skip`, which must find them all before the first step).

  Raises:
    PreparedError: the first bad file, unless `skip`.
  """
  bad = {}
  for v in shards:
    for split in SPLITS:
      try:
        check_file(_local(root, cache, entries[v][split]), entries[v][split], full=skip)
      except PreparedError as e:
        if not skip:
          raise
        bad.setdefault(v, str(e))
  return bad


def _skip(bad: Sequence[int], num_shards: int) -> dict[int, int]:
  """Bad shard -> the good shard whose examples its rows read (the next one, cyclically).

  Raises:
    PreparedError: when every shard is bad.
  """
  if len(bad) == num_shards:
    raise PreparedError(f"every one of the {num_shards} shards is damaged")
  good = lambda v: next(w % num_shards for w in range(v + 1, v + num_shards)
                        if w % num_shards not in bad)
  return {v: good(v) for v in bad}


def load_prepared(data_cfg: ml_collections.ConfigDict, tokenizer_dir: str | None, *,
                  shards: Sequence[int] | None = None,
                  save_tokenizer: bool | None = None) -> PreparedData:
  """The examples of the shards `shards` (default: all) of `data_cfg.prepared`.

  Reads only the manifest and DIR's tokenizer (copied to `tokenizer_dir` by process 0, or
  when `save_tokenizer`), and checks the files read here (`check_file`). A `gs://` DIR's files
  read here are first copied to a local cache (`_cache`), once per host. With
  `data_cfg.skip_bad_shards` it checks every byte of every file instead, on every host, so all
  agree: a bad shard's rows then read the next good shard's training examples (in their own
  order, with their own masks), its eval examples are left out, and the skip is logged and
  counted (`shards/skipped`).

  Raises:
    SettingsMismatch: `data_cfg` asks for other examples, naming the field.
    PreparedError: no manifest, or a missing or damaged file (named).
  """
  root = epath.Path(data_cfg.prepared)
  manifest = read_manifest(root)
  check_run(manifest, data_cfg, root)
  mixture = _mixture(manifest, data_cfg, root)
  tokenizer = load_tokenizer(root / TOKENIZER_DIR, lowercase=data_cfg.lowercase)
  save = jax.process_index() == 0 if save_tokenizer is None else save_tokenizer
  if tokenizer_dir and save and not has_tokenizer(tokenizer_dir):
    tokenizer.save(tokenizer_dir)
  entries = manifest["shards"]
  shards = list(range(len(entries)) if shards is None else shards)
  skip = bool(data_cfg.skip_bad_shards)
  cache = _cache(root, manifest)
  bad = _bad_shards(root, cache, entries, range(len(entries)) if skip else shards, skip)
  for v, why in sorted(bad.items()):
    logging.warning("Skipping shard %d (data.skip_bad_shards): %s", v, why)
  skipped = _skip(bad, len(entries))
  read_from = {v: skipped.get(v, v) for v in range(len(entries))}
  files = {split: {v: str(_local(root, cache, entries[read_from[v]][split])) for v in shards}
           for split in SPLITS}
  table = np.array([[e["train"]["examples"], e["eval"]["examples"], e["tokens_crc32"]]
                    for e in (entries[read_from[v]] for v in range(len(entries)))],
                   np.int32)  # [S, 3]
  table[list(bad), 1] = 0  # a skipped shard's eval examples
  source_sizes = np.array([entries[read_from[v]]["sources"] for v in range(len(entries))],
                          np.int32)  # [S, K]
  counters = {f"{split}/{k}": sum(entries[read_from[v]][split]["packing"][k] for v in shards)
              for split in SPLITS for k in PackingStats().as_dict()}
  counters.update({"tokenizer/vocab_size": tokenizer.vocab_size, "shards/read": len(shards),
                   "shards/total": len(entries), "shards/skipped": len(bad)})
  logging.info("Prepared data %s: shards %s of %d read here: %s", root, shards, len(entries),
               counters)
  return PreparedData(tokenizer=tokenizer, shard_table=table, source_sizes=source_sizes,
                      mixture=mixture, max_seq_length=data_cfg.max_seq_length,
                      masking=mlm_data.masking_of(tokenizer, data_cfg), seed=data_cfg.seed,
                      counters=counters, files=files,
                      dtype=record_dtype(data_cfg.max_seq_length, tokenizer.vocab_size))
