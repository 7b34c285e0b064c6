r"""Corpus-scale data: preparation throughput, pretrain start-up and memory, loader throughput.

  python -m benchmarks.prepare --text=PATH --sizes_mb=30,300 --out=/tmp/jaxfm_bench_prepare

PATH is a text file or a folder of them (WikiExtractor `<doc ...>` / `</doc>` lines are
dropped; undecodable bytes replaced). For each size the script

1. builds a corpus of that many MB by repeating the text, as `--num_shards` files (one per
   shard, so each shard reads only its own file);
2. prepares it (`python -m jaxfm.prepare --workers=N`, a fresh process) with one WordPiece
   vocabulary trained once on the first MB of text, and reports tokens/s (wall) and tokens per
   CPU-second of the preparing processes, beside the raw `tokenizers` encode rate on the same
   text (one thread: per core), each also per CPU-second, which a shared machine's load
   leaves nearly unchanged;
3. pretrains BERT-tiny for `--steps` steps from the prepared folder (a fresh process) and
   reports the process's wall and CPU time from start to exit (start-up, compile, the steps,
   the final save) and its peak RSS;
4. times the loader alone over the prepared folder (examples/s, with 0 and `--loader_workers`
   grain workers) and the cores one v5e-8 host's bert-base consumption would need.

One JSON line per size on stdout; the host load average is printed beside each, since the
machine may be shared.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

from absl import app, flags

_TEXT = flags.DEFINE_string("text", None, "A text file, or a folder of them, to repeat.")
_SIZES_MB = flags.DEFINE_list("sizes_mb", ["30", "300"], "Corpus sizes in MB.")
_OUT = flags.DEFINE_string("out", "/tmp/jaxfm_bench_prepare", "Scratch folder (reused).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "Shards (and corpus files).")
_WORKERS = flags.DEFINE_integer("workers", 0, "jaxfm.prepare --workers (0 = every core).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 30522, "WordPiece vocabulary size.")
_SEQ = flags.DEFINE_integer("max_seq_length", 128, "Sequence length.")
_STEPS = flags.DEFINE_integer("steps", 2, "Pretraining steps from the prepared folder.")
_LOADER_BATCHES = flags.DEFINE_integer("loader_batches", 200, "Timed loader batches.")
_LOADER_WORKERS = flags.DEFINE_integer("loader_workers", 2, "Grain workers for the 2nd timing.")
_BATCH = 32
# One v5e-8 host at bert-base, seq 128: 8 chips x 197 bf16 TFLOP/s x 50% MFU / 0.55 GFLOP/token.
HOST_TOKENS_PER_S = 8 * 197e12 * 0.5 / 0.55e9
_ROOT = pathlib.Path(__file__).resolve().parents[1]
_MB = 1 << 20


def _documents(path: pathlib.Path) -> Iterator[str]:
  """The text lines of `path` (a file or a folder, sorted), WikiExtractor tags dropped."""
  files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
  for file in files:
    for line in file.read_bytes().decode("utf-8", errors="replace").splitlines():
      if not line.startswith(("<doc ", "</doc>")):
        yield line.rstrip()


def build_corpus(text: pathlib.Path, size_mb: float, folder: pathlib.Path, files: int) -> int:
  """Writes `files` files of about `size_mb` MB in total, repeating `text`; returns bytes."""
  folder.mkdir(parents=True, exist_ok=True)
  block = ("\n".join(_documents(text)) + "\n\n").encode("utf-8")
  target = int(size_mb * _MB)
  per_file = -(-target // files)
  written = 0
  for k in range(files):
    with open(folder / f"part-{k:03d}.txt", "wb") as f:
      left = min(per_file, target - written)
      while left > 0:
        f.write(block[:left])
        left -= min(left, len(block))
      written += f.tell()
  return written


def _run(args: Sequence[str]) -> tuple[float, float, float]:
  """Runs `python args` from the project root: (wall s, CPU s, peak RSS MiB) of that process
  (with the processes it waited for)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  start = time.perf_counter()
  with tempfile.TemporaryFile("w+") as log:
    proc = subprocess.Popen([sys.executable, *args], cwd=_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
      log.seek(0)
      raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {log.read()[-3000:]}")
  return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def train_tokenizer(text: pathlib.Path, folder: pathlib.Path) -> float:
  """Trains the WordPiece vocabulary on the first MB of the text once; returns seconds."""
  from jaxfm.data.tokenizer import has_tokenizer, train_tokenizer as train  # pylint: disable=g-import-not-at-top
  if has_tokenizer(folder):
    return 0.0
  start = time.perf_counter()
  lines, size = [], 0
  for line in _documents(text):
    if line:
      lines.append(line)
      size += len(line)
    if size > _MB:
      break
  train(lines, vocab_size=_VOCAB_SIZE.value, lowercase=True).save(str(folder))
  return time.perf_counter() - start


def raw_encode_rate(text: pathlib.Path, folder: pathlib.Path) -> tuple[float, float]:
  """(tokens per wall second, per CPU second) of the `tokenizers` Rust encoder alone, one
  thread, on ~4 MB of the text."""
  os.environ["TOKENIZERS_PARALLELISM"] = "false"
  from jaxfm.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
  backend = load_tokenizer(str(folder), lowercase=True).backend
  lines, size = [], 0
  for line in _documents(text):
    if line:
      lines.append(line)
      size += len(line)
    if size > 4 * _MB:
      break
  wall, cpu = time.perf_counter(), time.process_time()
  tokens = sum(len(e.ids) for e in backend.encode_batch(lines, add_special_tokens=False))
  return tokens / (time.perf_counter() - wall), tokens / (time.process_time() - cpu)


def _overrides(corpus: pathlib.Path, tokenizer: pathlib.Path) -> list[str]:
  return [f"--config.data.train_files={corpus}/*.txt", f"--config.data.tokenizer={tokenizer}",
          f"--config.data.num_shards={_NUM_SHARDS.value}",
          f"--config.data.max_seq_length={_SEQ.value}", "--config.data.eval_fraction=0.01"]


def loader_rate(prepared: pathlib.Path, tokenizer: pathlib.Path,
                workers: int) -> tuple[float, float]:
  """(examples per wall second, per CPU second of this process) of the training iterator over
  `prepared` (one process, `workers` workers)."""
  from jaxfm.config import pretrain_defaults  # pylint: disable=g-import-not-at-top
  from jaxfm.data import loader, prepared as prepared_lib  # pylint: disable=g-import-not-at-top
  cfg = pretrain_defaults().data
  cfg.update(dict(prepared=str(prepared), tokenizer=str(tokenizer), num_shards=_NUM_SHARDS.value,
                  max_seq_length=_SEQ.value, eval_fraction=0.01))
  data = prepared_lib.load_prepared(cfg, None)
  it = data.train_iterator(loader.HostLayout(_BATCH, num_shards=_NUM_SHARDS.value),
                           worker_count=workers)
  try:
    for _ in range(10):
      next(it)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(_LOADER_BATCHES.value):
      next(it)
    examples = _LOADER_BATCHES.value * _BATCH
    return examples / (time.perf_counter() - wall), examples / (time.process_time() - cpu)
  finally:
    it.close()


def measure(size_mb: float, text: pathlib.Path, out: pathlib.Path,
            tokenizer: pathlib.Path) -> dict[str, float]:
  corpus, prepared = out / f"corpus-{size_mb:g}mb", out / f"prepared-{size_mb:g}mb"
  row: dict[str, float] = {"size_mb": size_mb,
                           "corpus_bytes": build_corpus(text, size_mb, corpus, _NUM_SHARDS.value),
                           "load_before": os.getloadavg()[0]}
  workers = _WORKERS.value or os.cpu_count() or 1
  shutil.rmtree(prepared, ignore_errors=True)
  wall, cpu, _ = _run(["-m", "jaxfm.prepare", "--config=configs/pretrain/bert_tiny_cpu.py",
                          *_overrides(corpus, tokenizer), f"--out={prepared}",
                          f"--workers={workers}"])
  manifest = json.loads((prepared / "manifest.json").read_text())
  tokens = sum(s[split]["packing"]["tokens"] for s in manifest["shards"]
               for split in ("train", "eval"))
  row.update(prepare_s=wall, prepare_workers=workers, tokens=tokens,
             prepare_tokens_per_s=tokens / wall, prepare_tokens_per_cpu_s=tokens / cpu,
             prepared_bytes=sum(p.stat().st_size for p in prepared.iterdir() if p.is_file()))
  workdir = out / f"run-{size_mb:g}mb"
  shutil.rmtree(workdir, ignore_errors=True)
  wall, cpu, rss = _run(["-m", "jaxfm.pretrain", "--config=configs/pretrain/bert_tiny_cpu.py",
                          *_overrides(corpus, tokenizer), f"--config.data.prepared={prepared}",
                          f"--config.train.steps={_STEPS.value}", "--config.train.eval_batches=1",
                          "--config.train.progress_bar=false", "--config.optim.warmup_steps=0",
                       f"--workdir={workdir}"])
  row.update(pretrain_process_s=wall, pretrain_process_cpu_s=cpu, pretrain_peak_rss_mib=rss)
  for workers in (0, _LOADER_WORKERS.value):
    row[f"loader_examples_per_s_workers{workers}"], per_cpu_s = loader_rate(prepared, tokenizer,
                                                                            workers)
    if not workers:  # with workers the batches are made elsewhere
      row["loader_examples_per_cpu_s_workers0"] = per_cpu_s
  per_core = row["loader_examples_per_cpu_s_workers0"] * _SEQ.value  # tokens/s of one core
  row["loader_cores_for_v5e8_host"] = HOST_TOKENS_PER_S / per_core
  row["load_after"] = os.getloadavg()[0]
  return row


def main(argv: Sequence[str]) -> None:
  del argv
  text, out = pathlib.Path(_TEXT.value), pathlib.Path(_OUT.value)
  out.mkdir(parents=True, exist_ok=True)
  tokenizer = out / "tokenizer"
  trained_s = train_tokenizer(text, tokenizer)
  raw, raw_cpu = raw_encode_rate(text, tokenizer)
  print(json.dumps({"tokenizer_train_s": trained_s, "raw_encode_tokens_per_s_one_thread": raw,
                    "raw_encode_tokens_per_cpu_s": raw_cpu, "cpus": os.cpu_count(),
                    "load": os.getloadavg()[0]}), flush=True)
  for size in _SIZES_MB.value:
    print(json.dumps(measure(float(size), text, out, tokenizer)), flush=True)


if __name__ == "__main__":
  flags.mark_flag_as_required("text")
  app.run(main)
