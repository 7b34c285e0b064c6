"""`jaxfm.prepare` and `data.prepared`: the online path's batches from disk, resumable and
checked preparation, refused mismatches."""

import hashlib
import pathlib
import shutil
import signal
import subprocess
import sys

import numpy as np
from etils import epath
import pytest

from jaxfm.config import ConfigError, pretrain_defaults
from jaxfm.data import loader, mlm_data, prepared
from jaxfm.pretraining import run
from tests.data_helpers import unmasked, write_corpus_files
from tests.test_pretrain_cli import SMALL, _run

T, P = 32, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Four files of random-word documents: the glob."""
  return write_corpus_files(tmp_path_factory.mktemp("corpus"), seed=4, docs_per_file=30)


def _cfg(train_files: str, **overrides):
  cfg = pretrain_defaults().data
  cfg.update(dict(train_files=train_files, vocab_size=200, max_seq_length=T,
                  max_predictions_per_seq=P, eval_fraction=0.1, seed=2, num_shards=2))
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def prepared_dir(corpus, tmp_path_factory):
  out = tmp_path_factory.mktemp("prepared") / "out"
  assert prepared.prepare(_cfg(corpus), str(out)) is not None
  return out


def _digests(folder) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
          if p.is_file()}


def _assert_same(want, got):
  for a, b in zip(want, got, strict=True):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("per_host,hosts", [(8, 1), (4, 2)])
def test_prepared_batches_are_the_online_ones(corpus, prepared_dir, tmp_path, per_host, hosts):
  online = mlm_data.build_pretraining_data(_cfg(corpus), str(tmp_path / "online"),
                                           max_position_embeddings=64)
  for h in range(hosts):
    layout = loader.HostLayout(per_host, h, hosts, 2)
    disk = prepared.load_prepared(_cfg("", prepared=str(prepared_dir)), str(tmp_path / "run"),
                                  shards=layout.shards)
    assert disk.tokenizer.vocab == online.tokenizer.vocab
    np.testing.assert_array_equal(disk.shard_table, online.shard_table)
    want, got = online.train_iterator(layout), disk.train_iterator(layout)
    assert got.get_state() == want.get_state()  # a run can switch paths and resume
    _assert_same([next(want) for _ in range(6)], [next(got) for _ in range(6)])
    assert disk.num_eval_batches(layout) == online.num_eval_batches(layout) > 0
    _assert_same(list(online.eval_batches(layout)), list(disk.eval_batches(layout)))
  assert prepared.load_prepared(_cfg("", prepared=str(prepared_dir)), None).counters[
      "train/examples"] == online.counters["train/examples"]


def test_grain_workers_open_the_files_themselves(corpus, prepared_dir):
  disk = prepared.load_prepared(_cfg("", prepared=str(prepared_dir)), None)
  layout = loader.HostLayout(8, num_shards=2)
  rows = disk.rows("train")
  next(iter(disk.train_iterator(layout)))
  rows(np.array([0, 1]), np.array([0, 0]))  # opens readers, which pickling leaves out
  assert rows.__getstate__()["_readers"] == {} and len(rows._readers) == 2
  with_workers = disk.train_iterator(layout, worker_count=1)
  try:
    _assert_same([next(disk.train_iterator(layout)) for _ in range(1)], [next(with_workers)])
  finally:
    with_workers.close()


def test_tokens_are_uint16_when_the_vocabulary_fits(prepared_dir):
  manifest = prepared.read_manifest(prepared_dir)
  assert manifest["record"]["token_dtype"] == "uint16"
  assert manifest["record"]["bytes"] == 2 * T + 8
  assert prepared.record_dtype(T, 70_000)["tokens"].base == np.int32
  assert [s["name"] for s in manifest["sources"]] == ["corpus"]
  assert manifest["sources"][0]["files"][0]["path"].endswith("part-0.txt")


def test_an_interrupted_prepare_resumes_to_the_same_files(corpus, prepared_dir, tmp_path):
  want = _digests(prepared_dir)
  out = tmp_path / "again"
  shutil.copytree(prepared_dir, out)
  (out / prepared.MANIFEST).unlink()
  (out / prepared.split_file("train", 1, 2)).unlink()
  for name in ("shard-00000-of-00002.json", prepared.split_file("eval", 0, 2)):
    (out / name).unlink()
  (out / (prepared.split_file("eval", 0, 2) + ".tmp")).write_bytes(b"half a file")
  kept = out / prepared.split_file("train", 0, 2)
  before = kept.stat().st_mtime_ns
  prepared.prepare(_cfg(corpus), str(out))
  assert _digests(out) == want
  assert kept.stat().st_mtime_ns > before  # shard 0 was unfinished, so it was written again
  before = (out / prepared.split_file("train", 1, 2)).stat().st_mtime_ns
  (out / prepared.MANIFEST).unlink()
  prepared.prepare(_cfg(corpus), str(out))  # every shard finished: only the manifest
  assert (out / prepared.split_file("train", 1, 2)).stat().st_mtime_ns == before
  assert _digests(out) == want


# Prepares `sys.argv[1]` into `sys.argv[2]` and SIGKILLs itself while shard 1's train file is
# half written (shard 0 finished).
_KILLED_PREPARE = """
import os, signal, sys
from jaxfm.data import prepared
from tests.test_prepare import _cfg

class KilledMidFile:
  write_records = prepared.ArrayRecordWriter

  def __init__(self, path, options):
    self.writer, self.path, self.written = self.write_records(path, options), path, 0

  def write(self, record):
    self.writer.write(record)
    self.written += 1
    if "train-00001-of-00002" in self.path and self.written == 3:
      os.kill(os.getpid(), signal.SIGKILL)

  def close(self):
    self.writer.close()

prepared.ArrayRecordWriter = KilledMidFile
prepared.prepare(_cfg(sys.argv[1]), sys.argv[2])
"""


def test_a_prepare_killed_mid_shard_resumes_to_byte_identical_files(corpus, prepared_dir,
                                                                      tmp_path):
  out = tmp_path / "killed"
  killed = subprocess.run([sys.executable, "-c", _KILLED_PREPARE, corpus, str(out)],
                          cwd=pathlib.Path(__file__).parents[1], capture_output=True, text=True,
                          timeout=300, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  left = {p.name for p in out.iterdir()}
  assert prepared.split_file("train", 1, 2) + ".tmp" in left and prepared.MANIFEST not in left
  finished = out / prepared.split_file("train", 0, 2)
  before = finished.stat().st_mtime_ns
  assert prepared.prepare(_cfg(corpus), str(out)) is not None
  assert _digests(out) == _digests(prepared_dir)
  assert finished.stat().st_mtime_ns == before  # shard 0 was finished: not written again


def _damaged(prepared_dir, tmp_path, damage) -> tuple:
  out = tmp_path / "damaged"
  shutil.copytree(prepared_dir, out)
  path = out / prepared.split_file("train", 1, 2)
  data = bytearray(path.read_bytes())
  path.write_bytes(damage(data))
  return out, path.name


def test_a_truncated_shard_file_is_an_error_naming_it(corpus, prepared_dir, tmp_path):
  out, name = _damaged(prepared_dir, tmp_path, lambda data: data[:len(data) // 2])
  with pytest.raises(prepared.PreparedError, match=f"{name} has .* bytes"):
    prepared.load_prepared(_cfg("", prepared=str(out)), None)
  with pytest.raises(prepared.PreparedError, match=name):
    prepared.prepare(_cfg(corpus), str(out))
  # Host 0 of 2 reads shard 0 only, so it does not need the damaged file.
  prepared.load_prepared(_cfg("", prepared=str(out)), None, shards=[0])


def _flip_a_byte_of_the_first_records(data: bytearray) -> bytearray:
  data[5000] ^= 0xFF  # inside a chunk of records: its hash no longer matches
  return data


def test_a_corrupt_shard_file_is_an_error_naming_it(corpus, prepared_dir, tmp_path):
  out, name = _damaged(prepared_dir, tmp_path, _flip_a_byte_of_the_first_records)
  with pytest.raises(prepared.PreparedError, match=f"{name}: (corrupt|crc32)"):
    prepared.prepare(_cfg(corpus), str(out))  # the rerun verifies every file
  disk = prepared.load_prepared(_cfg("", prepared=str(out)), None)
  entries = prepared.read_manifest(out)["shards"]
  with pytest.raises(prepared.PreparedError, match=f"{name}: corrupt"):
    disk.rows("train")(np.ones(entries[1]["train"]["examples"], np.int64),
                       np.arange(entries[1]["train"]["examples"]))


@pytest.mark.parametrize("field,value", [("max_seq_length", 64), ("seed", 3), ("num_shards", 1),
                                         ("eval_fraction", 0.2), ("vocab_size", 300),
                                         ("word_segmenter", "jieba")])
def test_a_run_that_wants_other_examples_is_refused(prepared_dir, field, value):
  with pytest.raises(prepared.SettingsMismatch, match=f"data.{field}={value!r} but .*manifest"):
    prepared.load_prepared(_cfg("", prepared=str(prepared_dir), **{field: value}), None)


def test_another_tokenizer_is_refused_and_the_same_accepted(prepared_dir, tmp_path):
  same = str(prepared_dir / prepared.TOKENIZER_DIR)
  prepared.load_prepared(_cfg("", prepared=str(prepared_dir), tokenizer=same), None)
  other = mlm_data.load_tokenizer(same, lowercase=True)
  vocab = sorted(other.vocab, key=other.vocab.get)
  (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t in vocab[:-1]))
  with pytest.raises(prepared.SettingsMismatch, match="data.tokenizer="):
    prepared.load_prepared(_cfg("", prepared=str(prepared_dir),
                                tokenizer=str(tmp_path / "vocab.txt")), None)


def test_a_prepare_with_another_config_is_refused(corpus, prepared_dir, tmp_path):
  with pytest.raises(prepared.SettingsMismatch, match="data.seed=5 but .*manifest.json"):
    prepared.prepare(_cfg(corpus, seed=5), str(prepared_dir))
  out = tmp_path / "partial"
  shutil.copytree(prepared_dir, out)
  (out / prepared.MANIFEST).unlink()
  with pytest.raises(prepared.SettingsMismatch, match="data.max_seq_length=64 but .*settings"):
    prepared.prepare(_cfg(corpus, max_seq_length=64), str(out))


def test_no_manifest_is_an_error_naming_the_command(tmp_path):
  with pytest.raises(prepared.PreparedError, match="jaxfm.prepare"):
    prepared.load_prepared(_cfg("", prepared=str(tmp_path)), None)


def test_a_run_from_another_preparation_is_a_config_error(corpus, prepared_dir, tmp_path):
  cfg = pretrain_defaults()
  cfg.data = _cfg("", prepared=str(prepared_dir), max_seq_length=64)
  with pytest.raises(ConfigError, match="data.max_seq_length=64 but"):
    run.pretraining_data(cfg, str(tmp_path), loader.HostLayout(8, num_shards=2))


def test_prepare_then_pretrain_cli(tmp_path):
  out, workdir = tmp_path / "prepared", tmp_path / "run"
  args = [a for a in SMALL if not a.startswith("--config.train.")] + [
      "--config.train.batch_size=8", "--config.train.steps=2", "--config.train.eval_every=2",
      "--config.train.eval_batches=1", "--config.train.checkpoint_every=2",
      "--config.train.progress_bar=false"]
  proc = _run("jaxfm.prepare", *args, f"--out={out}")
  assert proc.stdout.startswith(f"prepared {out}: 1 shard(s)") and "(uint16)" in proc.stdout
  proc = _run("jaxfm.pretrain", *args, f"--config.data.prepared={out}", f"--workdir={workdir}")
  assert "held-out MLM: step 0:" in proc.stdout and "step 2:" in proc.stdout
  assert (workdir / "tokenizer" / "vocab.txt").exists()
  proc = _run("jaxfm.prepare", *args, "--config.data.seed=1", f"--out={out}", check=False)
  assert proc.returncode == 1 and "error: data.seed=1 but" in proc.stderr


def test_workers_write_the_sequential_files(corpus, prepared_dir, tmp_path):
  out = tmp_path / "parallel"
  prepared.prepare(_cfg(corpus), str(out), workers=2)
  assert _digests(out) == _digests(prepared_dir)


def test_hosts_prepare_their_own_shards_and_the_last_writes_the_manifest(corpus, prepared_dir,
                                                                         tmp_path):
  out = tmp_path / "hosts"
  with pytest.raises(prepared.PreparedError, match="no tokenizer in .* after 0 s"):
    prepared.prepare(_cfg(corpus), str(out), shards=[1], tokenizer_wait_s=0.1)
  assert prepared.prepare(_cfg(corpus), str(out), shards=[0]) is None  # shard 1 is not done
  assert not (out / prepared.MANIFEST).exists()
  assert prepared.prepare(_cfg(corpus), str(out), shards=[1]) is not None
  assert _digests(out) == _digests(prepared_dir)


def test_a_damaged_record_index_is_found_at_start(corpus, prepared_dir, tmp_path):
  def flip_near_the_end(data: bytearray) -> bytearray:
    data[-100] ^= 0xFF
    return data
  out, name = _damaged(prepared_dir, tmp_path, flip_near_the_end)
  with pytest.raises(prepared.PreparedError, match=f"{name}: crc32 .* of its record index"):
    prepared.load_prepared(_cfg("", prepared=str(out)), None)


def test_a_bad_shard_is_a_counted_skip_when_asked(corpus, prepared_dir, tmp_path):
  out, name = _damaged(prepared_dir, tmp_path, _flip_a_byte_of_the_first_records)
  good = prepared.load_prepared(_cfg("", prepared=str(prepared_dir)), None)
  disk = prepared.load_prepared(_cfg("", prepared=str(out), skip_bad_shards=True), None)
  assert disk.counters["shards/skipped"] == 1 and good.counters["shards/skipped"] == 0
  assert disk.files["train"][1] == disk.files["train"][0]  # shard 1's rows read shard 0
  np.testing.assert_array_equal(disk.shard_table[1], [*good.shard_table[0, :1], 0,
                                                      good.shard_table[0, 2]])
  layout = loader.HostLayout(8, num_shards=2)
  batch = next(disk.train_iterator(layout))
  shard0 = {row.tobytes() for row in good.rows("train")(
      np.zeros(good.shard_table[0, 0], np.int64), np.arange(good.shard_table[0, 0])).tokens}
  assert all(row.tobytes() in shard0 for row in unmasked(batch)[4:])  # shard 1's rows
  assert disk.shard_table[:, 1].sum() == good.shard_table[0, 1]  # shard 1's eval left out


def test_prepare_to_gcs_and_train_from_it(corpus, prepared_dir, gcs_bucket, tmp_path):
  """Against the GCS emulator: the same files as a local DIR, and a run reads the same batches
  (from a local copy of the shards it reads)."""
  out = f"{gcs_bucket}/prepared"
  assert prepared.prepare(_cfg(corpus), out) is not None
  remote = epath.Path(out)
  want = _digests(prepared_dir)
  got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
         for p in [*remote.glob("*"), *remote.glob("*/*")] if p.is_file()}
  assert got == want
  layout = loader.HostLayout(4, 1, 2, 2)
  local = prepared.load_prepared(_cfg("", prepared=str(prepared_dir)), None, shards=[1])
  cloud = prepared.load_prepared(_cfg("", prepared=out), str(tmp_path / "tok"), shards=[1])
  assert all("://" not in path for path in cloud.files["train"].values())
  _assert_same([next(local.train_iterator(layout)) for _ in range(1)],
               [next(cloud.train_iterator(layout)) for _ in range(1)])
  assert prepared.prepare(_cfg(corpus), out) is not None  # verifies every remote byte
  (remote / prepared.split_file("train", 0, 2)).unlink()  # not copied here yet: shard 0
  with pytest.raises(prepared.PreparedError, match="train-00000-of-00002.arrayrecord is missing"):
    prepared.load_prepared(_cfg("", prepared=out), None)
  prepared.load_prepared(_cfg("", prepared=out), None, shards=[1])  # its copy is checked
