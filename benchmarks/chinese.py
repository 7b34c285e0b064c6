r"""Chinese end to end: BERT-tiny pretrained with character masking, with jieba whole-word
masking, and with character then whole-word masking, then fine-tuned on waimai_10k and MSRA NER
beside the same model from random init.

  python -m benchmarks.chinese --data=/path/to/chinese --out=/tmp/zh_study

`--data` holds `text/thucnews_1000.tsv` (`TOPIC<TAB>ARTICLE`), `text/peoples_daily_199801_seg.txt`
(space-segmented paragraphs), `waimai_10k/{train,dev,test}.tsv` and `msra_ner/{train,dev,test}.txt`.

1. Corpus: the THUCNews articles, one a line, then People's Daily with the segmentation spaces
   removed (kept between two ASCII letters or digits), consecutive paragraphs joined into lines of
   at least `--min_line_chars` characters (the paragraphs have no article boundaries; a line is a
   document, and each document's last example is padded, so short lines waste steps on padding).
2. Pretraining (configs/pretrain/bert_tiny_zh_cpu.py), same steps and seeds: whole-word masking
   by jieba first (`wwm`; it trains the vocabulary, with the CJK '##' pieces whole-word masking
   needs), then character masking (`char`, BERT's default) with that same vocabulary, so the two
   differ only in masking. Then each `--continued` arm MASKING_from_MODEL: MODEL's run continued
   with MASKING for `--continue_steps` (a fresh warmup and decay). `wwm_from_char` is what
   Chinese-BERT-wwm did from bert-base-chinese; `char_from_char` is its control, the same extra
   steps with character masking. `--continue_corpus` (with `--continue_corpus_name=NAME`)
   continues them on another text instead, e.g. in-domain reviews (a .tsv's first column, its
   header skipped, or a plain file's lines; one document a line, OUT/continue_NAME.txt, its
   held-out documents chosen by the same fraction and seed): the arms are then
   MASKING_from_MODEL@NAME, and their evaluations, cross evaluation included, are on that text.
   Held-out MLM loss/accuracy is measured on each run's own masking
   (the same held-out examples; a continued run's step 0 is MODEL on MASKING), so accuracies
   under the two maskings are not comparable 1:1; `--cross_eval` also scores each model on the
   other masking's held-out batches (a 1-step run from it that evaluates at step 0: the same
   held-out examples and masks as that masking's evaluations).
3. Fine-tuning (configs/finetune/{waimai,msra_ner}.py with `--*_epochs` and `--*_lr`, the same
   for every init) from random init (the same architecture and vocabulary) and from each
   pretrained model (`--inits`), for each seed (`train.seed` and `data.seed`). Dev: the best
   checkpoint's dev score (it picks the checkpoint); test (`--test`): that checkpoint on the test
   split, via `jaxfm.evaluate`. The default learning rates are the better of two for the
   random-init arm on seed 0 (waimai 1e-4 / 5e-4, MSRA 5e-4 / 1e-3), which favours the baseline.
   `--waimai_train_examples=N` fine-tunes on a label-stratified random sample of N reviews
   (`--waimai_sample_seed`, the same sample for every run, written to OUT/): train.tsv is sorted
   by label, so its first N would be one class. The low-resource study is
   `--waimai_train_examples=1000 --waimai_epochs=10 --waimai_lr=5e-4`: 5e-4 the best of
   1e-4 / 5e-4 / 1e-3 for random init on seed 0.

Every child runs as its own process, its command and output in OUT/logs/; a finished run's
result is kept in OUT/results/, so the same command again resumes the study (a changed command
for a finished run is refused: use a new --out). Prints a Markdown table and writes
OUT/results.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags

_DATA = flags.DEFINE_string("data", None, "The Chinese data folder (see the docstring).")
_OUT = flags.DEFINE_string("out", None, "Output folder: corpus, workdirs, logs, results.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 10000, "MLM steps of each pretraining.")
_PRETRAIN_SEED = flags.DEFINE_integer("pretrain_seed", 0, "train.seed and data.seed of both.")
_PRETRAIN_EVALS = flags.DEFINE_integer("pretrain_evals", 10, "Held-out evaluations per run.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.02, "Share of documents held out.")
_MIN_LINE_CHARS = flags.DEFINE_integer(
    "min_line_chars", 1000, "People's Daily paragraphs joined up to this many characters a line "
    "(0: one paragraph a line).")
_CROSS_EVAL = flags.DEFINE_bool("cross_eval", True, "Also score each model on the other masking.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Fine-tuning seeds.")
_CONTINUE_STEPS = flags.DEFINE_integer("continue_steps", 5000, "Steps of each --continued arm.",
                                       lower_bound=1)
_CONTINUED = flags.DEFINE_list(
    "continued", ["wwm_from_char"], "Arms MASKING_from_MODEL (wwm|char): MODEL's pretraining "
    "continued with MASKING (char_from_char: the same steps' control for wwm_from_char).")
_CONTINUE_CORPUS = flags.DEFINE_string(
    "continue_corpus", None, "Text the --continued arms train on instead of the pretraining "
    "corpus: a .tsv's first column (header skipped) or a plain file's lines.")
_CONTINUE_CORPUS_NAME = flags.DEFINE_string(
    "continue_corpus_name", None, "Name of --continue_corpus ([A-Za-z0-9_]+): the arms are "
    "MASKING_from_MODEL@NAME.")
_INITS = flags.DEFINE_list("inits", ["random", "char", "wwm", "wwm_from_char"],
                           "Fine-tuning starting points.")
_TASKS = flags.DEFINE_list("tasks", ["waimai", "msra_ner"], "Fine-tuning tasks.")
_WAIMAI_EPOCHS = flags.DEFINE_float("waimai_epochs", 2.0, "waimai_10k epochs.")
_WAIMAI_LR = flags.DEFINE_float("waimai_lr", 5e-4, "waimai_10k peak learning rate.")
_WAIMAI_EXAMPLES = flags.DEFINE_integer(
    "waimai_train_examples", 0, "0 = all; else a label-stratified sample of N (train.tsv is "
    "sorted by label: its first 3,200 reviews are positive).")
_WAIMAI_SAMPLE_SEED = flags.DEFINE_integer("waimai_sample_seed", 0,
                                           "Seed of that sample (the same for every run).")
_MSRA_EPOCHS = flags.DEFINE_float("msra_epochs", 2.0, "MSRA NER epochs.")
_MSRA_LR = flags.DEFINE_float("msra_lr", 1e-3, "MSRA NER peak learning rate.")
_MSRA_EXAMPLES = flags.DEFINE_integer("msra_train_examples", 10000,
                                      "The first N training sentences (0 = all 45,648).")
_TEST = flags.DEFINE_bool("test", True, "Also score the best checkpoint on the test split.")
flags.mark_flags_as_required(["data", "out"])

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PRETRAIN_CONFIG = "configs/pretrain/bert_tiny_zh_cpu.py"
_WWM = ("--config.data.whole_word_masking=True", "--config.data.word_segmenter=jieba")
_ASCII_WORD = "[A-Za-z0-9]"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  config: str
  files: str  # the split files' pattern, {split} in train|dev|test
  metric: str  # the dev/test metric reported
  epochs: float
  lr: float
  max_train_examples: int
  sample_seed: int | None  # the N as a label-stratified sample with this seed; None: the first N


@dataclasses.dataclass(frozen=True)
class Arm:
  """A pretraining run: its masking, the arm whose model it continues (None: scratch), and the
  name of the text it trains on (None: the pretraining corpus)."""
  name: str
  masking: str  # wwm | char
  steps: int
  init: str | None = None
  corpus: str | None = None


def _arms() -> list[Arm]:
  """wwm first: it trains the vocabulary every other arm uses."""
  arms = [Arm("wwm", "wwm", _PRETRAIN_STEPS.value), Arm("char", "char", _PRETRAIN_STEPS.value)]
  corpus = _continue_corpus_name()
  for name in _CONTINUED.value:
    match = re.fullmatch(r"(wwm|char)_from_(wwm|char)", name)
    if not match:
      raise app.UsageError(f"--continued: {name!r} is not MASKING_from_MODEL (wwm|char)")
    arms.append(Arm(f"{name}@{corpus}" if corpus else name, match[1], _CONTINUE_STEPS.value,
                    init=match[2], corpus=corpus))
  return arms


def _continue_corpus_name() -> str | None:
  """--continue_corpus_name, checked against --continue_corpus (both or neither)."""
  name = _CONTINUE_CORPUS_NAME.value
  if (name is None) != (_CONTINUE_CORPUS.value is None):
    raise app.UsageError("--continue_corpus and --continue_corpus_name go together")
  if name is not None and not re.fullmatch(r"[A-Za-z0-9_]+", name):
    raise app.UsageError(f"--continue_corpus_name: {name!r} is not [A-Za-z0-9_]+")
  if name is not None and not os.path.isfile(_CONTINUE_CORPUS.value):
    raise app.UsageError(f"--continue_corpus: no file {_CONTINUE_CORPUS.value}")
  return name


def _tasks() -> dict[str, Task]:
  return {
      "waimai": Task("waimai", "configs/finetune/waimai.py", "waimai_10k/{split}.tsv",
                     "accuracy", _WAIMAI_EPOCHS.value, _WAIMAI_LR.value, _WAIMAI_EXAMPLES.value,
                     _WAIMAI_SAMPLE_SEED.value),
      "msra_ner": Task("msra_ner", "configs/finetune/msra_ner.py", "msra_ner/{split}.txt", "f1",
                       _MSRA_EPOCHS.value, _MSRA_LR.value, _MSRA_EXAMPLES.value, None)}


def unsegment(line: str) -> str:
  """A space-segmented line as raw text: spaces go, except between two ASCII letters/digits."""
  return re.sub(rf"(?<!{_ASCII_WORD}) | (?!{_ASCII_WORD})", "", line.strip())


def _write_lines(path: pathlib.Path, lines: list[str]) -> None:
  """Writes the lines whole or not at all (a resumed study never reads a half-written file)."""
  tmp = path.with_suffix(".tmp")
  tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  tmp.replace(path)


def build_corpus(data: pathlib.Path, path: pathlib.Path, min_line_chars: int) -> dict[str, int]:
  """Writes the pretraining corpus (one document a line); returns its line and char counts."""
  lines = []
  with open(data / "text" / "thucnews_1000.tsv", encoding="utf-8") as f:
    lines += [row.rstrip("\n").split("\t", 1)[1].strip() for row in f if row.strip()]
  articles = len(lines)
  pending = ""
  with open(data / "text" / "peoples_daily_199801_seg.txt", encoding="utf-8") as f:
    for row in f:
      pending += unsegment(row)
      if pending and len(pending) >= min_line_chars:
        lines.append(pending)
        pending = ""
  if pending:
    lines.append(pending)
  _write_lines(path, lines)
  return {"lines": len(lines), "thucnews_lines": articles,
          "peoples_daily_lines": len(lines) - articles, "chars": sum(map(len, lines))}


def build_text_corpus(src: pathlib.Path, path: pathlib.Path) -> dict[str, int]:
  """Writes a text's non-empty documents one a line: a .tsv's first column (its header row
  skipped: no other column, e.g. a label, is read), else each line; returns line/char counts."""
  rows = src.read_text(encoding="utf-8").splitlines()
  if src.suffix == ".tsv":
    rows = [row.split("\t", 1)[0] for row in rows[1:]]
  # A BOM can start any row (online_shopping_7cats has one on its first review).
  lines = [text for text in (row.replace("\ufeff", "").strip() for row in rows) if text]
  if not lines:
    raise ValueError(f"--continue_corpus: {src} has no text")
  _write_lines(path, lines)
  return {"lines": len(lines), "chars": sum(map(len, lines))}


def stratified_sample(src: pathlib.Path, dst: pathlib.Path, n: int, seed: int,
                      label_field: str = "label") -> dict[str, int]:
  """Writes n rows of a TSV with a header, drawn at random (seeded) from each label in the
  label's share of the file (largest remainders round), in random order; returns the counts."""
  header, *rows = src.read_text(encoding="utf-8").splitlines(keepends=True)
  if not 0 < n <= len(rows):
    raise ValueError(f"sample of n={n} from {src}: it has {len(rows)} rows")
  column = header.rstrip("\n").split("\t").index(label_field)
  by_label: dict[str, list[str]] = {}
  for row in rows:
    by_label.setdefault(row.rstrip("\n").split("\t")[column], []).append(row)
  labels = sorted(by_label)
  quota = {label: n * len(by_label[label]) // len(rows) for label in labels}
  short = sorted(labels, key=lambda label: -(n * len(by_label[label]) % len(rows)))
  for label in short[:n - sum(quota.values())]:
    quota[label] += 1
  rng = random.Random(seed)
  sample = [row for label in labels for row in rng.sample(by_label[label], quota[label])]
  rng.shuffle(sample)
  tmp = dst.with_suffix(".tmp")
  tmp.write_text(header + "".join(sample), encoding="utf-8")
  tmp.replace(dst)
  return quota


def training_set(task: Task, data: pathlib.Path, out: pathlib.Path) -> tuple[pathlib.Path, int]:
  """The train file and data.max_train_examples of a task's fine-tunings: a sampled task's N
  are written to OUT/ (the loader keeps the first N)."""
  train = data / task.files.format(split="train")
  if task.sample_seed is None or not task.max_train_examples:
    return train, task.max_train_examples
  path = out / f"{task.name}_train_{task.max_train_examples}_seed{task.sample_seed}.tsv"
  counts = stratified_sample(train, path, task.max_train_examples, task.sample_seed)
  print(f"{task.name} training sample {path}: {counts}", flush=True)
  return path, 0


class Study:
  """Runs the children one at a time, each once per output folder."""

  def __init__(self, out: pathlib.Path):
    self.out = out
    for sub in ("logs", "results", "runs"):
      (out / sub).mkdir(parents=True, exist_ok=True)
    # One compilation cache for every child: the seeds and inits compile the same steps.
    self.env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(out / "compile_cache")}

  def workdir(self, name: str) -> str:
    return str(self.out / "runs" / name)

  def run(self, name: str, command: list[str]) -> dict[str, Any]:
    """The child's result {command, wall_s, last JSON line or None}: from OUT/results when this
    command finished before, else run now (output in OUT/logs/NAME.log); exits if it fails."""
    done = self.out / "results" / f"{name}.json"
    text = shlex.join(command)
    if done.exists():
      result = json.loads(done.read_text())
      if result["command"] != text:
        sys.exit(f"{done} was run as\n  {result['command']}\nnot\n  {text}\nuse a new --out")
      print(f"[{name}] done before ({result['wall_s']} s)", flush=True)
      return result
    print(f"[{name}] {text}", flush=True)
    log = self.out / "logs" / f"{name}.log"
    start = time.time()
    with open(log, "w", encoding="utf-8") as f:
      f.write(text + "\n")
      f.flush()
      proc = subprocess.run(command, cwd=_ROOT, env=self.env, stdout=subprocess.PIPE,
                            stderr=f, text=True, check=False)
      f.write(proc.stdout)
    wall_s = round(time.time() - start, 1)
    if proc.returncode != 0:
      sys.exit(f"[{name}] failed ({proc.returncode}); see {log}:\n"
               + log.read_text(encoding="utf-8")[-3000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    result = {"command": text, "wall_s": wall_s,
              "json": json.loads(lines[-1]) if lines else None}
    done.write_text(json.dumps(result, indent=1))
    print(f"[{name}] {wall_s} s", flush=True)
    return result


def _evals(workdir: str) -> list[dict[str, Any]]:
  from jaxfm import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  return [r for r in workdir_lib.read_metrics(workdir) if r["split"] == "eval"]


def pretrain(study: Study, corpora: dict[str | None, pathlib.Path]) -> dict[str, dict[str, Any]]:
  """Every pretraining arm in order, each on its corpus (`corpora[arm.corpus]`), then each model
  on the other masking (`--cross_eval`) of its own corpus."""
  seed = _PRETRAIN_SEED.value

  def common(arm: Arm) -> list[str]:
    return [sys.executable, "-m", "jaxfm.pretrain", f"--config={_PRETRAIN_CONFIG}",
            f"--config.data.train_files={corpora[arm.corpus]}", f"--config.data.eval_fraction="
            f"{_EVAL_FRACTION.value}", f"--config.train.seed={seed}",
            f"--config.data.seed={seed}", "--config.train.eval_batches=100000",
            "--config.train.progress_bar=False"]
  vocab = [f"--config.data.tokenizer={study.workdir('pretrain_wwm')}/tokenizer"]
  masking = {"wwm": list(_WWM), "char": []}
  arms = _arms()
  rows = {}
  for arm in arms:
    workdir = study.workdir(f"pretrain_{arm.name}")
    schedule = [f"--config.train.steps={arm.steps}",
                f"--config.optim.warmup_steps={arm.steps // 10}",
                f"--config.train.eval_every={max(1, arm.steps // _PRETRAIN_EVALS.value)}",
                f"--config.train.checkpoint_every={arm.steps}"]
    init = [f"--config.init_from={study.workdir(f'pretrain_{arm.init}')}"] if arm.init else []
    result = study.run(f"pretrain_{arm.name}", [
        *common(arm), f"--workdir={workdir}", *schedule, *masking[arm.masking],
        *([] if arm is arms[0] else vocab), *init])
    evals = _evals(workdir)
    rows[arm.name] = {"masking": arm.masking, "init": arm.init, "corpus": arm.corpus,
                      "steps": arm.steps, "wall_s": result["wall_s"], "command": result["command"],
                      "evals": [{k: r[k] for k in ("step", "loss", "accuracy")} for r in evals],
                      "own": {"loss": evals[-1]["loss"], "accuracy": evals[-1]["accuracy"]}}
  if _CROSS_EVAL.value:
    for arm in arms:
      other = "char" if arm.masking == "wwm" else "wwm"
      name = f"eval_{arm.name}_on_{other}_masking"
      workdir = study.workdir(name)
      result = study.run(name, [*common(arm), f"--workdir={workdir}",
                                f"--config.init_from={study.workdir(f'pretrain_{arm.name}')}",
                                "--config.train.steps=1", "--config.optim.warmup_steps=0",
                                "--config.train.eval_every=1", "--config.train.checkpoint_every=1",
                                "--config.train.eval_at_start=True", *masking[other],
                                *vocab])
      start = next(r for r in _evals(workdir) if r["step"] == 0)
      rows[arm.name][f"on_{other}_masking"] = {
          "loss": start["loss"], "accuracy": start["accuracy"], "wall_s": result["wall_s"],
          "command": result["command"]}
  return rows


def finetune(study: Study, task: Task, init: str, seed: int, data: pathlib.Path,
             train: tuple[pathlib.Path, int]) -> dict[str, Any]:
  """One fine-tuning run on `train` (file, max examples) and its test evaluation: dev and test
  metric of the best checkpoint."""
  name = f"{task.name}_{init}_seed{seed}"
  workdir = study.workdir(name)
  files = {split: str(data / task.files.format(split=split)) for split in ("dev", "test")}
  command = [sys.executable, "-m", "jaxfm.finetune", f"--config={task.config}",
             f"--workdir={workdir}", f"--config.data.train_file={train[0]}",
             f"--config.data.dev_file={files['dev']}", f"--config.data.test_file={files['test']}",
             f"--config.data.max_train_examples={train[1]}",
             f"--config.train.epochs={task.epochs}", f"--config.optim.peak_learning_rate={task.lr}",
             f"--config.train.seed={seed}", f"--config.data.seed={seed}",
             "--config.train.progress_bar=False"]
  if init == "random":
    tokenizer = pathlib.Path(study.workdir("pretrain_wwm")) / "tokenizer"
    vocab_size = len((tokenizer / "vocab.txt").read_text(encoding="utf-8").splitlines())
    command += [f"--config.data.tokenizer={tokenizer}", f"--config.model.vocab_size={vocab_size}",
                "--config.model.max_position_embeddings=128"]
  else:
    command.append(f"--config.init_from={study.workdir(f'pretrain_{init}')}")
  result = study.run(name, command)
  best = result["json"]["best_step"]
  dev = next(r for r in _evals(workdir) if r["step"] == best)
  row = {"task": task.name, "init": init, "seed": seed, "dev": dev[task.metric],
         "best_step": best, "steps": result["json"]["step"], "wall_s": result["wall_s"],
         "command": result["command"]}
  if _TEST.value:
    test = study.run(f"{name}_test", [sys.executable, "-m", "jaxfm.evaluate",
                                      f"--workdir={workdir}", "--split=test"])
    row.update(test=test["json"][task.metric], test_wall_s=test["wall_s"],
               test_command=test["command"])
  return row


def _stats(values: list[float]) -> str:
  mean = 100 * statistics.mean(values)
  spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
  return f"**{mean:.2f}**{spread} ({', '.join(f'{100 * v:.2f}' for v in values)})"


def table(results: dict[str, Any]) -> str:
  """The study as Markdown: pretraining rows, then fine-tuning rows (mean ± sd (each seed))."""
  out = ["| pretraining | steps | held-out loss / acc, own masking | on char masking | "
         "on wwm masking | wall s |", "|---|---|---|---|---|---|"]
  for arm, row in results["pretraining"].items():
    cells = []
    for masking in ("char", "wwm"):
      cross = row.get(f"on_{masking}_masking")
      cells.append(f"{cross['loss']:.3f} / {100 * cross['accuracy']:.2f}" if cross else
                   ("(own)" if masking == row["masking"] else "–"))
    out.append(f"| {arm} | {row['steps']} | {row['own']['loss']:.3f} / "
               f"{100 * row['own']['accuracy']:.2f} | {' | '.join(cells)} | {row['wall_s']} |")
  out += ["", "| task | init | dev (mean ± sd (seeds)) | test | wall s per seed |",
          "|---|---|---|---|---|"]
  for task in _TASKS.value:
    for init in _INITS.value:
      rows = [r for r in results["finetuning"] if r["task"] == task and r["init"] == init]
      if not rows:
        continue
      test = _stats([r["test"] for r in rows]) if all("test" in r for r in rows) else "–"
      wall = statistics.mean(r["wall_s"] + r.get("test_wall_s", 0) for r in rows)
      out.append(f"| {task} | {init} | {_stats([r['dev'] for r in rows])} | {test} | "
                 f"{wall:.0f} |")
  return "\n".join(out)


def wall_by_part(results: dict[str, Any]) -> dict[str, float]:
  """Seconds the children of each part took (summed; each child from spawn to exit)."""
  parts = {f"pretrain_{arm}": row["wall_s"] for arm, row in results["pretraining"].items()}
  parts["cross_evals"] = sum(row[key]["wall_s"] for row in results["pretraining"].values()
                             for key in row if key.startswith("on_"))
  for task in _TASKS.value:
    parts[f"finetune_{task}"] = sum(r["wall_s"] + r.get("test_wall_s", 0)
                                    for r in results["finetuning"] if r["task"] == task)
  return {k: round(v, 1) for k, v in parts.items()}


def main(argv):
  del argv
  data, out = pathlib.Path(_DATA.value), pathlib.Path(_OUT.value).resolve()
  pretrained = {arm.name for arm in _arms()}
  unknown = set(_INITS.value) - pretrained - {"random"}
  if unknown:
    raise app.UsageError(f"--inits: {sorted(unknown)} not among random, {sorted(pretrained)} "
                         "(a continued arm needs --continued)")
  study = Study(out)
  tasks = _tasks()
  start = time.time()
  corpus = out / "corpus.txt"
  results: dict[str, Any] = {"corpus": build_corpus(data, corpus, _MIN_LINE_CHARS.value)}
  print(f"corpus {corpus}: {results['corpus']}", flush=True)
  corpora: dict[str | None, pathlib.Path] = {None: corpus}
  name = _continue_corpus_name()
  if name:
    corpora[name] = out / f"continue_{name}.txt"
    results["continue_corpus"] = {"name": name, "source": _CONTINUE_CORPUS.value,
                                  **build_text_corpus(pathlib.Path(_CONTINUE_CORPUS.value),
                                                      corpora[name])}
    print(f"continue corpus {corpora[name]}: {results['continue_corpus']}", flush=True)
  results["pretraining"] = pretrain(study, corpora)
  results["finetuning"] = []
  for task in _TASKS.value:
    train = training_set(tasks[task], data, out)
    for seed in map(int, _SEEDS.value):
      for init in _INITS.value:
        results["finetuning"].append(finetune(study, tasks[task], init, seed, data, train))
  results["wall_s"] = round(time.time() - start, 1)
  results["wall_s_by_part"] = wall_by_part(results)
  (out / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
  print(table(results))
  print(f"wall s by part: {results['wall_s_by_part']} (sum "
        f"{sum(results['wall_s_by_part'].values()):.0f}); this invocation {results['wall_s']} s; "
        f"results in {out / 'results.json'}")


if __name__ == "__main__":
  app.run(main)
