"""Real multi-process runs of `python -m jaxfm.pretrain`: 2 local CPU processes x 4 fake devices.

The processes join through `jax.distributed` (coordinator on a free loopback port, gloo
collectives) exactly as on a TPU pod. Every wait is bounded (harness.MAX_WAIT_S) and every
child process group is killed when a test ends. The runs of a module share a persistent XLA
compilation cache: relaunches on the same topology load their executables instead of
compiling them again (the tests' main cost on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import sys
import time
from typing import Callable, Iterator

import numpy as np
import pytest

from jaxfm import runtime
from jaxfm.config import pretrain_defaults
from jaxfm.data import loader, mlm_data
from tests.data_helpers import random_documents, unmasked
from tests.multihost import harness as h

STEPS = 12
# The tiny CPU config, shrunk: one layer, short sequences, a 16-example global batch, per-step
# metrics, evaluation over the whole (uneven) held-out set at 0 and the end, and the corpus in 2
# shards, so that each of 2 processes reads, tokenises and packs only its own half.
TINY = ["--config=configs/pretrain/bert_tiny_cpu.py", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", f"--config.train.eval_every={STEPS}",
        "--config.train.eval_batches=100", "--config.train.checkpoint_every=3",
        "--config.train.batch_size=16", "--config.train.progress_bar=false",
        "--config.data.vocab_size=512", "--config.data.max_seq_length=64",
        "--config.model.num_layers=1", "--config.optim.warmup_steps=1",
        "--config.data.num_shards=2"]


def _train(workdir: pathlib.Path, num_processes: int, devices: int, overrides: list[str],
           tokenizer_from: pathlib.Path | None = None) -> None:
  """One complete run; reuses another run's tokenizer (identical, and saves training it)."""
  if tokenizer_from is not None:
    shutil.copytree(tokenizer_from / "tokenizer", workdir / "tokenizer")
  with h.launched(h.pretrain_argv(workdir, *overrides), num_processes, devices,
                  workdir.parent, workdir.name) as group:
    group.wait()


def _losses(workdir: pathlib.Path) -> list[float]:
  train = h.records(workdir, "train")
  assert sorted(train) == list(range(1, STEPS + 1)), sorted(train)
  return [train[s]["loss"] for s in sorted(train)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> pathlib.Path:
  """The module's folder, shared by pytest-xdist workers (see `_once`)."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the folder above every worker's own
  (root / "multihost").mkdir(exist_ok=True)
  return root / "multihost"


def _once(runs: pathlib.Path, name: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """`runs/name`, built by whichever pytest worker asks first; the others reuse it."""
  target, done = runs / name, runs / f"{name}.done"
  with h.exclusive(runs / f"{name}.lock"):
    if not done.exists():
      shutil.rmtree(target, ignore_errors=True)
      build(target)
      done.touch()
  return target


@pytest.fixture(scope="module", autouse=True)
def _compilation_cache(runs) -> Iterator[None]:
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("JAX_COMPILATION_CACHE_DIR", str(runs / "xla-cache"))
    yield


@pytest.fixture(scope="module")
def two_process_run(runs) -> pathlib.Path:
  """The uninterrupted 2 x 4 reference run (with dropout), checkpoints every 3 steps."""
  return _once(runs, "two", lambda w: _train(w, 2, 4, TINY))


def test_two_processes_train_like_one_process(runs, two_process_run):
  two, one = two_process_run, runs / "one"
  _train(one, 1, 8, TINY, tokenizer_from=two_process_run)  # same rows, same dropout masks
  np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-5, atol=1e-5)
  evals = [h.records(w, "eval") for w in (two, one)]
  assert sorted(evals[0]) == sorted(evals[1]) == [0, STEPS]
  for step in (0, STEPS):  # the whole uneven eval set, reduced over both hosts
    for key in ("loss", "accuracy"):
      np.testing.assert_allclose(evals[0][step][key], evals[1][step][key], rtol=1e-5, atol=1e-6)
  assert evals[0][STEPS]["loss"] < evals[0][0]["loss"]  # it trained


def test_each_process_reads_only_its_shard(runs, two_process_run):
  for i in (0, 1):
    log = (runs / f"two-proc{i}.log").read_text()
    assert f"Pretraining data: shards [{i}] of 2 read here" in log, log[-2000:]


def test_two_processes_train_from_prepared_data_like_from_the_corpus(runs, two_process_run):
  """`jaxfm.prepare` once, then the 2 x 4 run from its shards: the online run's losses and
  evaluations (the same examples, masks and dropout)."""
  out, workdir = runs / "prepared-data", runs / "from-prepared"
  data = [a for a in TINY if a.startswith("--config.data.") or a.startswith("--config=")]
  with h.launched([sys.executable, "-m", "jaxfm.prepare", f"--out={out}", *data], 1, 1, runs,
                  "prepare") as group:
    group.wait()
  _train(workdir, 2, 4, [*TINY, f"--config.data.prepared={out}"])
  np.testing.assert_allclose(_losses(workdir), _losses(two_process_run), rtol=1e-5, atol=1e-5)
  evals = [h.records(w, "eval") for w in (workdir, two_process_run)]
  for step in (0, STEPS):
    np.testing.assert_allclose(evals[0][step]["loss"], evals[1][step]["loss"], rtol=1e-5)
  for i in (0, 1):
    log = (runs / f"from-prepared-proc{i}.log").read_text()
    assert f"Prepared data {out}: shards [{i}] of 2 read here" in log, log[-2000:]
    assert "corpus/text_lines" not in log, log[-2000:]  # no text read


def _examples(batch: dict[str, np.ndarray]) -> list[bytes]:
  """The unmasked rows behind a batch (a row identifies its example), padding rows dropped."""
  real = batch["masked_weights"].sum(axis=1) > 0
  return [row.tobytes() for row in unmasked(batch)[real]]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> mlm_data.PretrainingData:
  docs = random_documents(np.random.default_rng(0), 120)
  folder = tmp_path_factory.mktemp("small-data")
  (folder / "corpus.txt").write_text("\n\n".join(docs) + "\n")
  cfg = pretrain_defaults().data
  cfg.update(dict(train_files=str(folder / "corpus.txt"), vocab_size=200, max_seq_length=32,
                  max_predictions_per_seq=5, eval_fraction=0.15, seed=1))
  return mlm_data.build_pretraining_data(cfg, str(folder / "tokenizer"),
                                       max_position_embeddings=64)


@pytest.mark.parametrize("hosts,per_host", [(2, 7), (3, 7)])
def test_hosts_see_every_example_once_per_epoch(small_data, hosts, per_host):
  data, global_batch = small_data, hosts * per_host
  n = len(data.train)
  ids = {row.tobytes(): i for i, row in enumerate(data.train.tokens)}
  assert len(ids) == n and n % global_batch  # distinct rows, and an uneven last batch
  iters = [data.train_iterator(loader.HostLayout(per_host, s, hosts)) for s in range(hosts)]
  # The global batch is the hosts' batches side by side (make_array_from_process_local_data).
  seen = [[ids[r] for it in iters for r in _examples(next(it))] for _ in range(-(-n // global_batch))]
  assert all(len(b) == global_batch for b in seen)
  whole, straddling = [i for b in seen[:-1] for i in b], seen[-1]
  assert len(set(whole)) == len(whole)  # no duplicate before the epoch's last batch
  counts = np.bincount(whole + straddling, minlength=n)
  assert counts.min() == 1  # no gap: every example by the batch that ends the epoch
  assert (counts == 2).sum() == len(seen) * global_batch - n  # the rest opens epoch 2
  eval_count = data.num_eval_batches(loader.HostLayout(per_host, 0, hosts))
  found, padding = [], 0
  for s in range(hosts):
    batches = list(data.eval_batches(loader.HostLayout(per_host, s, hosts)))
    assert len(batches) == eval_count  # every host runs the same collectives: no hang
    for batch in batches:
      rows = _examples(batch)
      found += rows
      padding += per_host - len(rows)
  assert sorted(found) == sorted(row.tobytes() for row in data.eval.tokens)  # once each
  assert padding == hosts * eval_count * per_host - len(data.eval) > 0  # zero-weight padding


def _wait_lines(group: h.Group, workdir: pathlib.Path, after: int) -> None:
  """Waits until process 0 has written a train record past the first `after` lines."""
  def written() -> bool:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().split("\n")[after:-1] if path.exists() else []
    return any('"split": "train"' in line for line in lines)
  group.wait_for(written, f"a new train step in {workdir / 'metrics.jsonl'}")


def _line_count(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  return path.read_text().count("\n") if path.exists() else 0


def _resumed_from(group: h.Group) -> int:
  text = group.logs[0].read_text()
  marker = "resumed from step "
  assert marker in text, group.tails()
  return int(text.split(marker)[-1].split()[0])


def _sigterm_one_then_resume(runs: pathlib.Path, reference: pathlib.Path, overrides: list[str],
                             name: str, target: int, sigkill_first: bool) -> None:
  """[SIGKILL both after a checkpoint, relaunch,] SIGTERM process `target`, relaunch to the end.

  Every leg must leave the metrics of the uninterrupted run bitwise unchanged.
  """
  workdir = runs / name
  shutil.copytree(reference / "tokenizer", workdir / "tokenizer")
  argv = h.pretrain_argv(workdir, *overrides)
  if sigkill_first:
    with h.launched(argv, 2, 4, runs, f"{name}-a") as group:
      group.wait_for(lambda: any(0 < s < STEPS for s in h.committed_steps(workdir)),
                     "a first checkpoint")
      group.kill()  # SIGKILL, mid-run: an async save may be half written
    killed_at = max(h.committed_steps(workdir))
    assert killed_at < STEPS, "the run ended before the kill: make it longer"
  with h.launched(argv, 2, 4, runs, f"{name}-b") as group:
    _wait_lines(group, workdir, after=_line_count(workdir))
    group.signal(target, signal.SIGTERM)
    start = time.monotonic()
    group.wait(timeout_s=30, codes=[runtime.PREEMPTED_EXIT] * 2)  # saved, not finished
    took = time.monotonic() - start
    saved = max(h.committed_steps(workdir))
    last = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()][-1]
    assert (last["split"], last["step"]) == ("train", saved)  # saved where it stopped
    if sigkill_first:
      assert _resumed_from(group) == killed_at
    assert saved < STEPS, f"the run ended at step {saved} before SIGTERM stopped it"
    assert "(preempted; rerun to resume)" in group.logs[0].read_text(), group.tails()
  for process in (0, 1):  # both hosts took part in saving the same step
    assert (workdir / "checkpoints" / str(saved) / "state" / "array_metadatas"
            / f"process_{process}").exists()
  print(f"{name}: SIGTERM to process {target} -> both exited {runtime.PREEMPTED_EXIT} after {took:.1f} s, saved "
        f"step {saved}", file=sys.stderr)
  with h.launched(argv, 2, 4, runs, f"{name}-c") as group:
    group.wait()
    assert _resumed_from(group) == saved
  assert _losses(workdir) == _losses(reference)
  assert h.records(workdir, "eval") == h.records(reference, "eval")


def test_sigkill_then_sigterm_resume_exactly(runs, two_process_run):
  _sigterm_one_then_resume(runs, two_process_run, TINY, "chain", target=1,
                           sigkill_first=True)


@pytest.mark.slow
def test_sigkill_then_sigterm_to_the_coordinator_resume_exactly(runs, two_process_run):
  _sigterm_one_then_resume(runs, two_process_run, TINY, "coordinator-chain", target=0,
                           sigkill_first=True)


@pytest.fixture(scope="module")
def restore_report(runs, two_process_run) -> dict:
  """restore_check.py's report on the 2-process checkpoint, read by 1 process on mesh 2x4x1."""
  def build(folder: pathlib.Path) -> None:
    folder.mkdir()
    argv = [sys.executable, "-m", "tests.multihost.restore_check",
            f"--workdir={two_process_run}", "--mesh=2,4,1", f"--out={folder / 'report.json'}"]
    with h.launched(argv, 1, 8, folder, "restore") as group:
      group.wait()
  return json.loads((_once(runs, "restore-2x4x1", build) / "report.json").read_text())


def test_two_process_checkpoint_restores_on_another_mesh(restore_report, two_process_run):
  report = restore_report
  assert report["step"] == STEPS
  assert report["mesh_shapes"] == ["{'data': 2, 'fsdp': 4, 'tensor': 1}"]
  assert report["sharded_leaves"] > 0  # really resharded over fsdp, not only replicated
  assert report["differ"] == [], report  # bitwise equal to a restore onto one device
  written = h.records(two_process_run, "eval")[STEPS]  # computed by the 2 processes in memory
  for key in ("loss", "accuracy"):
    np.testing.assert_allclose(report["eval"][key], written[key], rtol=1e-5, atol=1e-6)


def test_load_params_reads_a_two_process_checkpoint(restore_report):
  assert restore_report["load_params"] == [], restore_report["load_params"]


def test_preflight_prints_the_topology_once_and_names_mesh_fields(runs, two_process_run):
  logs = [(runs / f"two-proc{i}.log").read_text() for i in (0, 1)]
  assert logs[0].count("topology: 2 process(es), 4 local / 8 global cpu devices, "
                       "mesh {'data': 8, 'fsdp': 1, 'tensor': 1}") == 1, logs[0][-2000:]
  assert "topology:" not in logs[1]
  workdir = runs / "bad-mesh"
  with h.launched(h.pretrain_argv(workdir, *TINY, "--config.mesh.data=3"), 2, 4, runs,
                  workdir.name) as group:
    group.wait(timeout_s=60, codes=[1, 1])
    for log in group.logs:
      assert ("error: mesh.data=3, mesh.fsdp=1, mesh.tensor=1 does not match the 8 devices of "
              "this run (2 process(es) x 4 local)") in log.read_text(), group.tails()


def test_a_missing_peer_fails_after_the_init_timeout(runs):
  # Process 1 never starts; process 0 must give up after JAX_INIT_TIMEOUT_S, not hang.
  script = '[ "$JAX_PROCESS_ID" = 1 ] && exit 0; JAX_INIT_TIMEOUT_S=5 exec "$0" "$@"'
  argv = ["bash", "-c", script, *h.pretrain_argv(runs / "lonely", *TINY)]
  with h.launched(argv, 2, 4, runs, "lonely") as group:
    group.wait(timeout_s=60, codes=[-signal.SIGABRT, 0])  # JAX aborts on DEADLINE_EXCEEDED
  log = group.logs[0].read_text()
  assert "process 0 of 2 joining 127.0.0.1:" in log and "JAX_INIT_TIMEOUT_S=5 s" in log, log[-3000:]
  assert "DEADLINE_EXCEEDED" in log, log[-3000:]
