"""Chinese fine-tuning: character-level NER from MSRA-style `CHAR<TAB>TAG` files scored like
seqeval, bad rows named by `file:line`, and the Chinese configs (issue 32)."""

from __future__ import annotations

import json
import pathlib
import re

import jax
import numpy as np
import pytest
import seqeval.metrics
from absl import flags
from ml_collections import config_flags

from tests import finetune_fixtures as ff
from jaxfm import config as config_lib
from jaxfm import interop, tasks
from jaxfm.finetuning import run
from jaxfm.metrics import ner as ner_metrics
from jaxfm.models import BertForMaskedLM, preset
from jaxfm.tasks import ner

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB = ROOT / "tests" / "fixtures" / "zh_vocab.txt"
MSRA = ROOT.parent / "shared" / "data" / "chinese" / "msra_ner"
TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]

# [text|TYPE] marks an entity; every character is one token.
TRAIN = """\
[张伟|PER]在[北京|LOC]工作。
[李娜|PER]去了[上海|LOC]。
[王芳|PER]是[清华大学|ORG]的老师。
[新华社|ORG]记者在[南京|LOC]报道。
[外交部|ORG]发言人[刘洋|PER]说。
[陈静|PER]来自[广州|LOC]。
[北京大学|ORG]位于[北京|LOC]。
[杨明|PER]和[张伟|PER]在[天津|LOC]见面。
今天天气很好。
[上海|LOC]的[人民银行|ORG]开会。
[李娜|PER]在[新华社|ORG]工作。
[赵军|PER]说[武汉|LOC]很热。
他们从[广州|LOC]到[南京|LOC]。
[王芳|PER]看了报纸。
[中国银行|ORG]在[天津|LOC]有分行。
[刘洋|PER]是[外交部|ORG]的官员。
大家都很高兴。
[陈静|PER]和[杨明|PER]是朋友。
[清华大学|ORG]的学生去[武汉|LOC]。
[赵军|PER]在[人民银行|ORG]上班。
[北京|LOC]和[上海|LOC]都是大城市。
[张伟|PER]给[李娜|PER]打电话。
[新华社|ORG]发表文章。
[南京|LOC]的冬天很冷。
[王芳|PER]在[中国银行|ORG]工作。
这是一个好消息。
[杨明|PER]从[天津|LOC]回来了。
[外交部|ORG]在[北京|LOC]开会。
[刘洋|PER]去[广州|LOC]出差。
[北京大学|ORG]的[陈静|PER]老师说。
"""
DEV = """\
[赵军|PER]在[上海|LOC]工作。
[李娜|PER]是[北京大学|ORG]的学生。
[新华社|ORG]记者[王芳|PER]说。
[张伟|PER]去了[武汉|LOC]。
[人民银行|ORG]在[南京|LOC]开会。
[陈静|PER]从[广州|LOC]回来了。
我们都很高兴。
[杨明|PER]在[清华大学|ORG]上班。
[中国银行|ORG]和[外交部|ORG]在[天津|LOC]。
"""
# MSRA's cut sentences can open with an I- tag: seqeval (and jaxfm) read it as an entity start.
CUT = [("海", "I-LOC"), ("的", "O"), ("刘", "B-PER"), ("洋", "I-PER"), ("说", "O"), ("。", "O")]


def _sentence(annotated: str) -> list[tuple[str, str]]:
  rows = []
  for plain, text, kind in re.findall(r"([^\[]+)|\[([^|]+)\|(\w+)\]", annotated):
    rows += [(c, "O") for c in plain]
    rows += [(c, ("B-" if i == 0 else "I-") + kind) for i, c in enumerate(text)]
  return rows


def _write(path: pathlib.Path, sentences: list[list[tuple[str, str]]]) -> str:
  path.write_text("".join("".join(f"{c}\t{t}\n" for c, t in s) + "\n" for s in sentences),
                  encoding="utf-8")
  return str(path)


def _load(path: str, **overrides):
  """A config file as `--config=` loads it (absl config_flags), then dotted-field overrides."""
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values)
  values(["test", f"--config={ROOT / path}"])
  cfg = values.config
  cfg.update_from_flattened_dict(overrides)
  return cfg


@pytest.fixture(scope="module")
def msra(tmp_path_factory):
  """MSRA-format train/dev files and a random BERT-tiny with the Chinese fixture vocab."""
  root = tmp_path_factory.mktemp("zh")
  train = [_sentence(s) for s in TRAIN.splitlines()]
  dev = [_sentence(s) for s in DEV.splitlines()] + [CUT]
  vocab = VOCAB.read_text(encoding="utf-8").splitlines()
  assert {c for s in train + dev for c, _ in s} <= set(vocab)  # no [UNK] in the fixture
  config = preset("tiny", vocab_size=len(vocab), max_position_embeddings=ff.SEQ)
  ids = np.zeros((1, 8), np.int32)
  params = BertForMaskedLM(config).init(jax.random.key(1), ids, ids, np.ones_like(ids))["params"]
  model_dir = root / "pretrained"
  (root / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
  interop.save_model_dir(str(model_dir), config, params, [str(root / "vocab.txt")])
  return (root, str(model_dir), _write(root / "train.txt", train),
          _write(root / "dev.txt", dev), dev)


def test_reads_char_tab_tag_one_word_per_character(msra):
  _, _, train, dev, sentences = msra
  examples = ner.read_conll(dev, tag_column=-1, scheme="iob2", label_names=TAGS)
  assert [list(zip(e.words, e.tags)) for e in examples] == sentences
  assert examples[1].guid == f"{dev}:{len(sentences[0]) + 2}"  # file:line of the first char
  assert len(ner.read_conll(train)) == len(TRAIN.splitlines())


def test_msra_config_finetunes_and_f1_equals_seqeval(msra, tmp_path):
  root, model_dir, train, dev, sentences = msra
  cfg = _load("configs/finetune/msra_ner.py", **{
      "init_from": model_dir, "data.train_file": train, "data.dev_file": dev,
      "data.max_seq_length": ff.SEQ, "train.batch_size": 16, "train.epochs": 12.0, "data.length_buckets": "",
      "train.log_every": 10, "train.progress_bar": False, "optim.peak_learning_rate": 2e-3,
      "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0})
  workdir = str(tmp_path / "msra")
  result, _ = run.finetune(cfg, workdir)
  inputs = tmp_path / "dev.jsonl"
  inputs.write_text("".join(json.dumps({"tokens": [c for c, _ in s]}, ensure_ascii=False) + "\n"
                            for s in sentences), encoding="utf-8")
  predicted = [r["tags"] for r in run.predict(workdir, str(inputs))]
  true = [[t for _, t in s] for s in sentences]
  metrics = run.evaluate(workdir, "dev")
  assert metrics["f1"] == pytest.approx(seqeval.metrics.f1_score(true, predicted))
  assert metrics["precision"] == pytest.approx(seqeval.metrics.precision_score(true, predicted))
  assert metrics["recall"] == pytest.approx(seqeval.metrics.recall_score(true, predicted))
  assert metrics["f1"] > 0.5, (metrics, predicted)  # it learnt entities: the check is not 0 == 0


@pytest.mark.parametrize("row, message", [
    ("京\tB-LOC\tO", "3 columns, expected 2"),
    ("京\tS-LOC", r"tag 'S-LOC' is not O or B/I- plus a type \(iob2\)"),
    ("京\tLOC", r"tag 'LOC' is not O"),
])
def test_bad_row_names_file_and_line(tmp_path, row, message):
  path = tmp_path / "bad.txt"
  path.write_text(f"北\tB-LOC\n京\tI-LOC\n\n在\tO\n{row}\n", encoding="utf-8")
  with pytest.raises(ValueError, match=rf"{path}:5: {message}"):
    ner.read_conll(str(path), tag_column=-1, scheme="iob2")


@pytest.mark.parametrize("path, kind", [
    ("configs/finetune/msra_ner.py", "ner"),
    ("configs/finetune/waimai.py", "classification"),
    ("configs/pretrain/bert_tiny_zh_cpu.py", "pretrain"),
])
def test_chinese_configs_load_and_validate(path, kind):
  if kind == "pretrain":
    cfg = _load(path)
    config_lib.validate(cfg)
    assert cfg.data.lowercase and cfg.data.vocab_size >= 4096 and cfg.data.documents == "line"
    return
  cfg = _load(path, **{"data.train_file": "train.tsv"})
  tasks.validate_finetune(cfg)
  assert cfg.task == kind and cfg.data.lowercase
  if kind == "ner":
    assert (cfg.data.tag_column, cfg.data.tag_scheme) == (-1, "iob2")
  else:
    assert (cfg.data.has_header, cfg.data.text_fields, cfg.data.label_field) == (
        True, "sentence", "label")


def test_waimai_config_fields_match_the_data():
  path = MSRA.parent / "waimai_10k" / "train.tsv"
  if not path.exists():
    pytest.skip(f"{path} is absent")
  cfg = _load("configs/finetune/waimai.py")
  with path.open(encoding="utf-8") as f:
    header = f.readline().rstrip("\n").split("\t")
  assert header == [cfg.data.text_fields, cfg.data.label_field]


@pytest.mark.slow
def test_msra_dev_file_reads_and_scores_like_seqeval():
  """The real MSRA dev file: its README's counts, and entity scores equal to seqeval's on a
  corrupted copy (every 7th tag shifted), cut sentences with a leading I- included."""
  path = MSRA / "dev.txt"
  if not path.exists():
    pytest.skip(f"{path} is absent")
  examples = ner.read_conll(str(path), tag_column=-1, scheme="iob2", label_names=TAGS)
  assert len(examples) == 4998 and sum(len(e.words) for e in examples) == 210515
  assert all(len(w) == 1 for e in examples for w in e.words)
  true = [list(e.tags) for e in examples]
  counts = {}
  for tags in true:
    for kind, _, _ in ner_metrics.get_entities(tags):
      counts[kind] = counts.get(kind, 0) + 1
  assert counts == {"PER": 1505, "LOC": 1646, "ORG": 1086}
  flat = [t for tags in true for t in tags]
  shifted = [TAGS[(TAGS.index(t) + 1) % len(TAGS)] if i % 7 == 0 else t
             for i, t in enumerate(flat)]
  predicted, start = [], 0
  for tags in true:
    predicted.append(shifted[start:start + len(tags)])
    start += len(tags)
  metrics = ner_metrics.compute(true, predicted)
  assert metrics["f1"] == pytest.approx(seqeval.metrics.f1_score(true, predicted))
  assert metrics["precision"] == pytest.approx(seqeval.metrics.precision_score(true, predicted))
  assert metrics["recall"] == pytest.approx(seqeval.metrics.recall_score(true, predicted))
