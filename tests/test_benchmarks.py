"""`python -m benchmarks.step` runs and reports its documented fields (no timing assertions)."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaxfm.models import preset
from jaxfm.train.flops import mlm_flops_per_token

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_FIELDS = ("impl", "model", "task", "seq", "batch", "tokens_per_s", "step_s", "compile_s",
           "peak_rss_mib", "mfu", "first_step_s", "flops_per_token")


def _harness(*args: str) -> tuple[list[dict], str]:
  # One real CPU device, not the suite's 8 fake ones.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.step", "--json", "--steps=2", "--warmup=0",
       "--matmul_reps=1", *args], cwd=_ROOT, env=env, capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return [json.loads(line) for line in proc.stdout.splitlines()], proc.stderr


def _check_sane(row: dict, impl: str, seq: int, batch: int) -> None:
  assert set(_FIELDS) <= set(row), sorted(set(_FIELDS) - set(row))
  assert (row["impl"], row["model"], row["task"], row["seq"], row["batch"]) == (
      impl, "tiny", "mlm", seq, batch)
  assert row["step_s"] > 0 and row["first_step_s"] > 0 and row["compile_s"] >= 0
  assert abs(row["tokens_per_s"] * row["step_s"] - seq * batch) < 1e-6 * seq * batch
  assert 0 < row["mfu"] < 2 and row["peak_rss_mib"] > 50


def test_jaxfm_tiny_mlm_reports_every_field():
  (row,), _ = _harness("--model=tiny", "--task=mlm", "--impl=jaxfm")
  _check_sane(row, "jaxfm", 128, 32)
  assert row["compile_s"] > 0
  assert row["flops_per_token"] == mlm_flops_per_token(preset("tiny"), 128, 20)


@pytest.mark.slow  # importing torch + transformers alone takes ~5 s here
def test_both_impls_interleave_and_report_the_pair_ratio():
  rows, table = _harness("--model=tiny", "--task=mlm", "--seq=16", "--batch=2")
  assert [r["impl"] for r in rows] == ["jaxfm", "torch"]
  for row in rows:
    _check_sane(row, row["impl"], 16, 2)
  # The HF head runs at every position, jaxfm's at the 3 masked ones only.
  assert rows[1]["flops_per_token"] == mlm_flops_per_token(preset("tiny"), 16, 16)
  assert rows[0]["flops_per_token"] == mlm_flops_per_token(preset("tiny"), 16, 3)
  assert "jaxfm/torch tokens/s per pair: median" in table


def test_profile_kinds_from_hlo():
  from benchmarks import xla_ops  # pylint: disable=import-outside-toplevel  # no flags
  hlo = """
  %ynn_fusion.3 = f32[4096,256]{1,0} fusion(%a, %b), kind=kCustom
  %dot.7 = f32[32,4,128,64]{3,2,1,0} dot(%c, %d), lhs_batch_dims={0,1}
  %broadcast_add_fusion.2 = (u32[32,4,128,128]{3,2,1,0}, u32[32,4,128,128]{3,2,1,0}) fusion(%e)
  ROOT %copy_bitcast_fusion.4 = f32[256,4096]{1,0} fusion(%f), kind=kLoop
  %select_add_fusion.1 = f32[30522,256]{1,0} fusion(%g, %h), kind=kLoop
  """
  assert xla_ops.op_kinds(hlo) == {
      "ynn_fusion.3": "GEMM, dense", "dot.7": "GEMM, batched (attention)",
      "broadcast_add_fusion.2": "random bits (dropout)",
      "copy_bitcast_fusion.4": "copy / transpose",
      "select_add_fusion.1": "other (elementwise, reductions)"}


def test_profile_runs_on_the_real_step():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-m", "benchmarks.profile", "--model=tiny", "--task=mlm",
                         "--batch=8", "--steps=1"], cwd=_ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  shares = {line[:34].strip(): float(line.split()[-1].rstrip("%"))
            for line in proc.stdout.splitlines()[2:]}
  assert shares["GEMM, dense"] > 10 and shares["random bits (dropout)"] > 0, proc.stdout
  assert abs(sum(shares.values()) - 100) < 0.5, proc.stdout


def _ab(*flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.run([sys.executable, "-m", "benchmarks.ab", "--model=tiny", "--task=mlm",
                         "--seq=16", "--batch=4", "--pairs=2", *flags], cwd=_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def test_ab_alternates_two_model_configs_of_the_real_step():
  proc = _ab("--a=loss_vocab_chunk=0", "--b=loss_vocab_chunk=1000,hidden_dropout=0.0")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  assert lines[0] == "tiny mlm seq 16 batch 4, 2 pairs", proc.stdout
  assert lines[1].startswith("  A {'loss_vocab_chunk': 0}: median ")
  assert lines[2].startswith("  B {'loss_vocab_chunk': 1000, 'hidden_dropout': 0.0}: median ")
  assert lines[3].startswith("  time A / time B per pair: median ")


def test_ab_rejects_an_unknown_or_mistyped_field():
  proc = _ab("--a=vocab_chunk=1")
  assert proc.returncode != 0 and "'vocab_chunk=1': expected NAME=VALUE" in proc.stderr
  proc = _ab("--b=num_layers=two")
  assert proc.returncode != 0 and "not a valid int for num_layers" in proc.stderr


def test_peak_rss_is_the_processs_own_and_resets_to_the_current_rss():
  # A parent 300 MiB larger than its child: ru_maxrss would hand the child the parent's peak.
  code = """
import json
from benchmarks import common
before = common.peak_rss_mib()
reset = common.reset_peak_rss()
after_reset = common.peak_rss_mib()
block = bytearray(200 * 2**20)
block[::4096] = b"x" * len(block[::4096])
print(json.dumps(dict(before=before, reset=reset, after_reset=after_reset,
                      after_alloc=common.peak_rss_mib())))
"""
  ballast = bytearray(300 * 2**20)
  ballast[::4096] = b"x" * len(ballast[::4096])
  proc = subprocess.run([sys.executable, "-c", code], cwd=_ROOT, capture_output=True, text=True,
                        timeout=60, check=True)
  del ballast
  rss = json.loads(proc.stdout)
  assert rss["before"] < 200, rss  # a bare interpreter plus numpy, not the 300+ MiB parent
  if not rss["reset"]:
    pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
  assert rss["after_reset"] <= rss["before"] + 1
  assert 190 < rss["after_alloc"] - rss["after_reset"] < 230, rss


@pytest.mark.slow  # two prepare and two pretrain processes: minutes on 2 shared cores
def test_prepare_benchmark_reports_every_field(tmp_path):
  from tests.data_helpers import random_documents  # pylint: disable=import-outside-toplevel
  text = tmp_path / "text.txt"
  text.write_text("\n\n".join(random_documents(np.random.default_rng(0), 200)))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.prepare", f"--text={text}", "--sizes_mb=0.1,0.2",
       f"--out={tmp_path / 'bench'}", "--num_shards=2", "--vocab_size=300", "--steps=1",
       "--loader_batches=3", "--loader_workers=1", "--max_seq_length=64"],
      cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  head, *rows = [json.loads(line) for line in proc.stdout.splitlines()]
  assert head["raw_encode_tokens_per_s_one_thread"] > 0
  assert [r["size_mb"] for r in rows] == [0.1, 0.2]
  for row in rows:
    assert abs(row["corpus_bytes"] - row["size_mb"] * 2**20) < 2
    assert row["tokens"] > 0 and row["prepare_tokens_per_s"] > 0
    assert row["pretrain_process_s"] > 0 and row["pretrain_peak_rss_mib"] > 50
    assert row["loader_examples_per_s_workers0"] > 0 and row["loader_examples_per_s_workers1"] > 0
  assert rows[1]["tokens"] > rows[0]["tokens"]


def _zh_lines() -> list[str]:
  text = (_ROOT / "tests" / "fixtures" / "zh_lines.txt").read_text(encoding="utf-8")
  return [" ".join(line.split()) for line in text.splitlines() if line.strip()]


def _zh_data(root: pathlib.Path) -> None:
  """A miniature of the Chinese data folder `benchmarks.chinese` reads, from the fixture lines."""
  lines = _zh_lines()
  for sub in ("text", "waimai_10k", "msra_ner"):
    (root / sub).mkdir(parents=True)
  (root / "text" / "thucnews_1000.tsv").write_text(
      "".join(f"体育\t{line}\n" for line in lines[:40]), encoding="utf-8")
  (root / "text" / "peoples_daily_199801_seg.txt").write_text(  # two-character "words"
      "".join(" ".join(line[i:i + 2] for i in range(0, len(line), 2)) + "\n"
              for line in lines[40:]), encoding="utf-8")
  for split, part in (("train", lines[:60]), ("dev", lines[60:80]), ("test", lines[80:])):
    (root / "waimai_10k" / f"{split}.tsv").write_text(
        "sentence\tlabel\n" + "".join(f"{s}\t{i % 2}\n" for i, s in enumerate(part)),
        encoding="utf-8")
    (root / "msra_ner" / f"{split}.txt").write_text("".join(
        "".join(f"{c}\t{('B-LOC' if j == 0 else 'I-LOC') if i % 2 and j < 2 else 'O'}\n"
                for j, c in enumerate(s.replace(" ", ""))) + "\n" for i, s in enumerate(part)),
        encoding="utf-8")


def test_chinese_corpus_joins_and_unsegments(tmp_path):
  from benchmarks import chinese  # pylint: disable=import-outside-toplevel
  assert chinese.unsegment("迈向 充满 希望 的 新 世纪 —— Windows 98 发布 ， ＭＰＡ 协议\n") == (
      "迈向充满希望的新世纪——Windows 98发布，ＭＰＡ协议")
  _zh_data(tmp_path)
  stats = chinese.build_corpus(tmp_path, tmp_path / "corpus.txt", min_line_chars=50)
  corpus = (tmp_path / "corpus.txt").read_text(encoding="utf-8").splitlines()
  assert stats["lines"] == len(corpus) and stats["thucnews_lines"] == 40
  assert all(len(line) >= 50 for line in corpus[40:-1])
  # Nothing lost but spaces.
  assert "".join(corpus[40:]).replace(" ", "") == "".join(_zh_lines()[40:]).replace(" ", "")


def test_chinese_stratified_sample_keeps_label_shares_of_a_sorted_file(tmp_path):
  from benchmarks import chinese  # pylint: disable=import-outside-toplevel
  src = tmp_path / "train.tsv"  # sorted by label as waimai's: the first N are all positive
  rows = [f"好{i}\t1\n" for i in range(30)] + [f"差{i}\t0\n" for i in range(70)]
  src.write_text("sentence\tlabel\n" + "".join(rows), encoding="utf-8")
  counts = chinese.stratified_sample(src, tmp_path / "a.tsv", 11, seed=0)
  assert counts == {"0": 8, "1": 3}  # 7.7 and 3.3: the larger remainder rounds up
  header, *sample = (tmp_path / "a.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
  assert header == "sentence\tlabel\n" and len(set(sample)) == 11 and set(sample) <= set(rows)
  assert sum(row.endswith("\t1\n") for row in sample) == 3
  assert sample[:3] != [row for row in sample if row.endswith("\t1\n")]  # shuffled, not grouped
  chinese.stratified_sample(src, tmp_path / "b.tsv", 11, seed=0)
  chinese.stratified_sample(src, tmp_path / "c.tsv", 11, seed=1)
  assert (tmp_path / "b.tsv").read_text() == (tmp_path / "a.tsv").read_text()
  assert (tmp_path / "c.tsv").read_text() != (tmp_path / "a.tsv").read_text()
  with pytest.raises(ValueError, match="n=101"):
    chinese.stratified_sample(src, tmp_path / "d.tsv", 101, seed=0)


def test_chinese_text_corpus_reads_only_the_text_column(tmp_path):
  from benchmarks import chinese  # pylint: disable=import-outside-toplevel
  src = tmp_path / "reviews.tsv"
  src.write_text("sentence\tlabel\tcat\n\ufeff很好的平板\t1\t平板\n \t0\t书籍\n质量 一般\t0\t书籍\n",
                 encoding="utf-8")
  assert chinese.build_text_corpus(src, tmp_path / "a.txt") == {"lines": 2, "chars": 10}
  assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "很好的平板\n质量 一般\n"
  plain = tmp_path / "reviews.txt"  # not a .tsv: every non-empty line is text, tabs and all
  plain.write_text("sentence\tlabel\n很好\n\n", encoding="utf-8")
  assert chinese.build_text_corpus(plain, tmp_path / "b.txt") == {"lines": 2, "chars": 16}
  header_only = tmp_path / "empty.tsv"
  header_only.write_text("sentence\n", encoding="utf-8")
  with pytest.raises(ValueError, match="has no text"):
    chinese.build_text_corpus(header_only, tmp_path / "c.txt")


@pytest.mark.parametrize("flag,error", [
    ("--inits=random,char_from_char", "--inits: ['char_from_char'] not among"),
    ("--continued=wwm_from_bert", "--continued: 'wwm_from_bert' is not MASKING_from_MODEL"),
    ("--continue_corpus_name=reviews", "--continue_corpus and --continue_corpus_name go together"),
    ("--continue_corpus=DIR/no.tsv --continue_corpus_name=reviews", "--continue_corpus: no file"),
    ("--continue_corpus=DIR/r.tsv --continue_corpus_name=re-views", "'re-views' is not"),
    ("--continue_corpus=DIR/r.tsv --continue_corpus_name=reviews --continued=char_from_char "
     "--inits=char_from_char", "--inits: ['char_from_char'] not among")])
def test_chinese_study_refuses_unknown_arms(tmp_path, flag, error):
  (tmp_path / "r.tsv").write_text("sentence\n很好\n", encoding="utf-8")
  command = [sys.executable, "-m", "benchmarks.chinese", f"--data={tmp_path}",
             f"--out={tmp_path / 'out'}", *flag.replace("DIR", str(tmp_path)).split()]
  proc = subprocess.run(command, cwd=_ROOT, capture_output=True, text=True, timeout=120,
                        check=False)
  assert proc.returncode != 0 and error in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "out").exists()


@pytest.mark.slow  # three pretraining runs, three cross evaluations, eight fine-tunings: minutes
def test_chinese_study_runs_end_to_end_and_resumes(tmp_path):
  pytest.importorskip("jieba")
  _zh_data(tmp_path / "data")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  command = [sys.executable, "-m", "benchmarks.chinese", f"--data={tmp_path / 'data'}",
             f"--out={tmp_path / 'out'}", "--pretrain_steps=2", "--pretrain_evals=1",
             "--eval_fraction=0.3", "--min_line_chars=0", "--seeds=0", "--waimai_epochs=1",
             "--msra_epochs=1", "--msra_train_examples=0", "--continue_steps=2",
             "--waimai_train_examples=40"]
  proc = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=1800, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((tmp_path / "out" / "results.json").read_text())
  for arm, other in (("char", "wwm"), ("wwm", "char"), ("wwm_from_char", "char")):
    row = results["pretraining"][arm]
    assert [e["step"] for e in row["evals"]] == [0, 2]
    for key in ("own", f"on_{other}_masking"):
      assert row[key]["loss"] > 0 and 0 <= row[key]["accuracy"] <= 1, (arm, key)
  rows = {(r["task"], r["init"]): r for r in results["finetuning"]}
  assert sorted(rows) == sorted((t, i) for t in ("waimai", "msra_ner")
                                for i in ("random", "char", "wwm", "wwm_from_char"))
  for row in rows.values():
    assert 0 <= row["dev"] <= 1 and 0 <= row["test"] <= 1 and row["seed"] == 0
  assert "| msra_ner | wwm |" in proc.stdout
  assert "--config.init_from=" + str(tmp_path / "out" / "runs" / "pretrain_char") in (
      results["pretraining"]["wwm_from_char"]["command"])
  sample = tmp_path / "out" / "waimai_train_40_seed0.tsv"
  assert f"--config.data.train_file={sample}" in rows[("waimai", "random")]["command"]
  assert len(sample.read_text(encoding="utf-8").splitlines()) == 1 + 40
  assert sorted(results["wall_s_by_part"]) == sorted([
      "pretrain_char", "pretrain_wwm", "pretrain_wwm_from_char", "cross_evals",
      "finetune_waimai", "finetune_msra_ner"])
  # The same command again finds every run done and prints the same table.
  again = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count("done before") == 3 + 3 + 8 * 2
  table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
  assert len(table) == 5 + 10 and table == [
      line for line in again.stdout.splitlines() if line.startswith("|")]


@pytest.mark.slow  # three pretraining runs and a fine-tuning: over a minute on 2 cores
def test_chinese_study_continues_on_another_corpus(tmp_path):
  pytest.importorskip("jieba")
  _zh_data(tmp_path / "data")
  texts = [line.replace(" ", "") for line in _zh_lines()[60:]][::-1]
  reviews = tmp_path / "reviews.tsv"
  reviews.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(texts)),
                     encoding="utf-8")
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  command = [sys.executable, "-m", "benchmarks.chinese", f"--data={tmp_path / 'data'}",
             f"--out={out}", "--pretrain_steps=2", "--pretrain_evals=1", "--eval_fraction=0.3",
             "--min_line_chars=0", "--seeds=0", "--tasks=waimai", "--waimai_epochs=1",
             "--waimai_train_examples=40", "--cross_eval=False", "--continued=char_from_char",
             "--continue_steps=2", f"--continue_corpus={reviews}", "--continue_corpus_name=reviews",
             "--inits=char_from_char@reviews", "--test=False"]
  proc = subprocess.run(command, cwd=_ROOT, env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert (out / "continue_reviews.txt").read_text(encoding="utf-8").splitlines() == texts
  assert results["continue_corpus"] == {"name": "reviews", "source": str(reviews),
                                        "lines": len(texts), "chars": sum(map(len, texts))}
  assert sorted(results["pretraining"]) == ["char", "char_from_char@reviews", "wwm"]
  arm, char = results["pretraining"]["char_from_char@reviews"], results["pretraining"]["char"]
  assert (arm["corpus"], arm["init"], arm["masking"]) == ("reviews", "char", "char")
  assert f"--config.data.train_files={out / 'continue_reviews.txt'}" in arm["command"]
  assert f"--config.data.train_files={out / 'corpus.txt'}" in char["command"]
  assert f"--config.init_from={out / 'runs' / 'pretrain_char'}" in arm["command"]
  # Step 0 is the char model on the reviews' held-out text, not on the news corpus's.
  assert [e["step"] for e in arm["evals"]] == [0, 2]
  assert arm["evals"][0]["loss"] != char["own"]["loss"]
  [row] = results["finetuning"]
  assert row["init"] == "char_from_char@reviews" and 0 <= row["dev"] <= 1
  assert f"--config.init_from={out / 'runs' / 'pretrain_char_from_char@reviews'}" in row["command"]
  assert "| waimai | char_from_char@reviews |" in proc.stdout


def test_pairs_from_squad_labels_the_answer_sentence_and_counts_a_crossing_answer(tmp_path):
  context = 'The cat sat. It was "tired." Then 3 dogs came! Why? Nobody knows.'
  qas = [{"id": "q1", "question": "How many dogs?", "answers": [
             {"text": "3 dogs", "answer_start": context.index("3 dogs")}]},
         {"id": "q2", "question": "Who crossed?", "answers": [
             {"text": "sat. It", "answer_start": context.index("sat. It")}]}]
  article = {"paragraphs": [{"context": context, "qas": qas}]}
  squad = tmp_path / "squad.json"
  squad.write_text(json.dumps({"version": "1.1", "data": [article, article]}))
  proc = subprocess.run([sys.executable, "-m", "benchmarks.pairs_from_squad", f"--squad={squad}",
                         f"--out={tmp_path}", "--dev_articles=1"], cwd=_ROOT,
                        capture_output=True, text=True, timeout=60, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  counts = json.loads(proc.stdout.splitlines()[-1])
  assert counts == {"train": {"pairs": 5, "positive": 1}, "dev": {"pairs": 5, "positive": 1},
                    "skipped_questions": 2}
  rows = (tmp_path / "train.tsv").read_text().splitlines()
  assert rows[0] == "question\tsentence\tlabel"
  assert [r.split("\t")[1:] for r in rows[1:]] == [
      ["The cat sat.", "0"], ['It was "tired."', "0"], ["Then 3 dogs came!", "1"],
      ["Why?", "0"], ["Nobody knows.", "0"]]
