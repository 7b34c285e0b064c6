"""5. Config: every validation rule, override typos, changed configs on resume, unwritable workdirs.

`RULES` has one row per rule of the `validate_*` functions of `jaxfm.config` and of the task
kinds in `jaxfm.tasks`; a meta-test parses those functions and fails when a check (or a field
of a multi-field check) has no row.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
import runpy
import subprocess
import sys
import traceback
from typing import Any, NamedTuple

import pytest

from jaxfm import config as config_lib
from jaxfm import tasks
from jaxfm import workdir as workdir_lib
from tests.reliability.conftest import LAUNCH_TIMEOUT_S, ROOT

_CHECKS = ("fail", "positive", "one_of")
# The modules whose validate_* functions the rules cover.
_MODULES = (config_lib, tasks, *(importlib.import_module(f"jaxfm.tasks.{kind}")
                                 for kind in ("classification", "ner", "qa")))


class Rule(NamedTuple):
  check: str  # the validate_* function to call: jaxfm.config's, or the fine-tuning entry K
  field: str
  value: Any
  message: str  # a fragment of the expected error
  context: dict[str, Any] = {}  # other fields the rule needs set


def _positive(check: str, *fields: str, value: Any = 0) -> list[Rule]:
  return [Rule(check, f, value, f"{f}={value!r} must be > 0") for f in fields]


M, MESH, O, T, S, D, F = ("validate_model", "validate_mesh", "validate_optim", "validate_train",
                          "validate_sequence_length", "validate_pretrain_data", "validate_finetune")
K = "tasks.validate_finetune"  # the task kind and its fields, then F
DI = "validate_distill"
PS = "validate_peft_schedule"
PR = "validate_prune"
VALIDATORS = {**{name: getattr(config_lib, name) for name in (M, MESH, O, T, S, D, F, DI, PS, PR)},
              K: tasks.validate_finetune}
QA, NER = {"task": "qa"}, {"task": "ner"}
LORA = {"peft.method": "lora", "init_from": "hf:base"}
PREFIX = {"peft.method": "prefix", "init_from": "hf:base"}
PROMPT = {"peft.method": "prompt", "init_from": "hf:base"}
HOULSBY = {"peft.method": "houlsby", "init_from": "hf:base"}
ADALORA = {"peft.method": "adalora", "init_from": "hf:base"}
HIDDEN = {"distill.losses": "kl=1,hidden=1"}
RULES = [
    *_positive(M, "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
               "model.intermediate_size", "model.max_position_embeddings",
               "model.type_vocab_size"),
    *_positive(M, "model.layer_norm_eps", "model.initializer_range", value=0.0),
    Rule(M, "model.num_heads", 5, "model.num_heads=5 does not divide model.hidden_size=128"),
    Rule(M, "model.embedding_size", -1, "model.embedding_size=-1 must be >= 0"),
    Rule(M, "model.loss_vocab_chunk", -1, "model.loss_vocab_chunk=-1 must be >= 0"),
    Rule(M, "model.hidden_dropout", 1.0, "model.hidden_dropout=1.0 must be in [0, 1)"),
    Rule(M, "model.attention_dropout", -0.1, "model.attention_dropout=-0.1 must be in [0, 1)"),
    Rule(M, "model.hidden_act", "swish", "model.hidden_act='swish' must be one of gelu"),
    Rule(M, "model.dtype", "int8", "model.dtype='int8' must be one of float32"),
    Rule(M, "model.remat_policy", "most", "model.remat_policy='most' must be one of none"),
    Rule(M, "model.cpu_paths", "always", "model.cpu_paths='always' must be one of auto, on, off"),
    Rule(MESH, "mesh.data", 0, "mesh.data=0 must be a positive size or -1"),
    Rule(MESH, "mesh.fsdp", -2, "mesh.fsdp=-2 must be a positive size or -1"),
    Rule(MESH, "mesh.tensor", 0, "mesh.tensor=0 must be a positive size or -1"),
    Rule(MESH, "mesh.fsdp", -1, "at most one of mesh.data/fsdp/tensor may be -1"),
    Rule(MESH, "mesh.tensor", 3, "mesh.tensor=3 does not divide model.num_heads=2"),
    Rule(MESH, "mesh.tensor", 2, "mesh.tensor=2 does not divide every layer's heads [1, 2]",
         {"model.pruned_heads": ((0,), ())}),
    Rule(MESH, "runtime.platform", "metal",
         "runtime.platform='metal' must be one of auto, tpu, gpu, cpu"),
    Rule(O, "optim.name", "sgd", "optim.name='sgd' must be one of adamw, lamb"),
    Rule(O, "optim.decay", "step", "optim.decay='step' must be one of linear, cosine, constant"),
    *_positive(O, "optim.peak_learning_rate", "optim.eps", value=0.0),
    Rule(O, "optim.b1", 1.0, "optim.b1=1.0 must be in [0, 1)"),
    Rule(O, "optim.b2", -0.5, "optim.b2=-0.5 must be in [0, 1)"),
    Rule(O, "optim.weight_decay", -0.1, "optim.weight_decay=-0.1 must be >= 0"),
    Rule(O, "optim.clip_norm", -1.0, "optim.clip_norm=-1.0 must be >= 0"),
    Rule(O, "optim.warmup_steps", -1, "optim.warmup_steps=-1 must be >= 0"),
    Rule(O, "optim.end_learning_rate_factor", -0.5, "optim.end_learning_rate_factor=-0.5 must be"),
    *_positive(T, "train.steps", "train.batch_size", "train.grad_accum_steps", "train.log_every",
               "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.max_consecutive_nonfinite"),
    Rule(T, "train.eval_batches", -1, "train.eval_batches=-1 must be >= 0"),
    Rule(T, "train.checkpoint_every_seconds", -1, "train.checkpoint_every_seconds=-1 must be >= 0"),
    Rule(T, "train.profile_steps", "15,10", "train.profile_steps='15,10' must be '' or "
         "'START,STOP' with 0 <= START < STOP"),
    Rule(T, "train.keep_every", 700, "train.keep_every=700 must be 0 or a multiple of "
         "train.checkpoint_every=500"),
    Rule(T, "train.grad_accum_steps", 5, "train.grad_accum_steps=5 does not divide "
         "train.batch_size=32"),
    Rule(T, "optim.warmup_steps", 2000, "optim.warmup_steps=2000 exceeds train.steps=1000"),
    Rule(D, "data.format", "csv", "data.format='csv' must be one of text, jsonl, tfds"),
    Rule(D, "data.documents", "para", "data.documents='para' must be one of blank_line, line"),
    Rule(D, "data.on_decode_error", "drop", "data.on_decode_error='drop' must be one of error"),
    *_positive(D, "data.max_seq_length", "data.max_predictions_per_seq", "data.vocab_size"),
    Rule(D, "data.format", "tfds", "data.format='tfds' needs data.tfds_name"),
    Rule(D, "data.max_seq_length", 1024, "data.max_seq_length=1024 exceeds "
         "model.max_position_embeddings=512"),
    Rule(S, "data.max_seq_length", 4, "data.max_seq_length=4 must be >= 8"),
    Rule(D, "data.max_seq_length", 4, "data.max_seq_length=4 must be >= 8"),
    Rule(D, "data.mask_prob", 1.0, "data.mask_prob=1.0 must be in (0, 1)"),
    Rule(D, "data.word_segmenter", "ltp", "data.word_segmenter='ltp' must be one of , jieba"),
    Rule(D, "data.word_segmenter", "jieba", "set data.whole_word_masking=True"),
    Rule(D, "data.word_segmenter_dict", "words.txt", "needs data.word_segmenter='jieba'"),
    Rule(D, "data.max_predictions_per_seq", 200, "data.max_predictions_per_seq=200 exceeds "
         "data.max_seq_length=128"),
    Rule(D, "data.eval_fraction", 1.0, "data.eval_fraction=1.0 must be in [0, 1)"),
    Rule(D, "data.worker_count", -1, "data.worker_count=-1 must be >= 0"),
    Rule(D, "data.num_shards", 0, "data.num_shards=0 must be >= 1 and divide train.batch_size=32"),
    Rule(D, "data.num_shards", 5, "data.num_shards=5 must be >= 1 and divide train.batch_size=32"),
    Rule(D, "data.vocab_size", 100, "data.vocab_size=100 must be >= 128 to train a tokenizer"),
    Rule(D, "data.sources", (("a", "a/*.txt", 1.0),), "data.sources replaces data.train_files",
         {"data.train_files": "x.txt"}),
    Rule(D, "data.sources", (("a", "a/*.txt"),), "must be (name, files, weight) triples"),
    Rule(D, "data.sources", (("a", "a/*", 1.0), ("a", "b/*", 1.0)), "needs a distinct name"),
    Rule(D, "data.sources", (("a", " ", 1.0),), "needs its files"),
    Rule(D, "data.sources", (("a", "a/*", 0.0),), "needs a weight > 0"),
    Rule(D, "model.vocab_size", 0, "model.vocab_size=0 must be >= 1", {"data.tokenizer": "v.txt"}),
    Rule(K, "task", "seq2seq", "task='seq2seq' must be one of classification"),
    Rule(F, "data.on_error", "ignore", "data.on_error='ignore' must be one of raise, skip"),
    Rule(K, "data.tag_scheme", "bio", "data.tag_scheme='bio' must be one of iob2", NER),
    Rule(F, "train.best_mode", "median", "train.best_mode='median' must be one of max, min"),
    Rule(F, "data.train_file", "", "data.train_file is required"),
    Rule(K, "data.tfds_name", "conll2003", "data.tfds_name='conll2003' is supported for "
         "classification only", NER),
    Rule(K, "data.text_fields", "a,b,c", "data.text_fields='a,b,c' must name one field or two"),
    Rule(K, "data.packing", True, "data.packing=True is not supported for task='qa'", QA),
    Rule(K, "data.max_examples_per_row", 0, "data.max_examples_per_row=0 must be in [1, "
         "data.max_seq_length // 2 = 64]", {"data.packing": True}),
    Rule(F, "data.max_seq_length", 4, "data.max_seq_length=4 must be >= 8"),
    *_positive(F, "data.max_buckets", "data.bucket_multiple"),
    Rule(F, "data.compile_cost_tokens", "1e5", "data.compile_cost_tokens='1e5' must be 'auto' "
         "or a whole number of tokens"),
    *(Rule(F, f, v, f"{f}={v!r} must be >= 0") for f, v in (
        ("data.max_train_examples", -1), ("data.max_eval_examples", -1), ("train.epochs", -1.0),
        ("train.eval_every", -1), ("train.checkpoint_every", -1),
        ("train.early_stopping_patience", -1), ("optim.warmup_ratio", -0.1))),
    Rule(F, "optim.layer_decay", 0.0, "optim.layer_decay=0.0 must be in (0, 1]"),
    Rule(F, "optim.warmup_ratio", 1.0, "optim.warmup_ratio=1.0 must be < 1"),
    Rule(F, "train.early_stopping_patience", 3, "train.early_stopping_patience needs a dev set"),
    Rule(F, "peft.method", "dora", "peft.method='dora' must be one of lora, adalora, ia3"),
    Rule(F, "peft.method", "lora", "peft.method='lora' needs init_from"),
    Rule(F, "peft.rank", 0, "peft.rank=0 must be > 0", LORA),
    Rule(F, "peft.alpha", 0.0, "peft.alpha=0.0 must be > 0", LORA),
    Rule(F, "peft.dropout", 1.0, "peft.dropout=1.0 must be in [0, 1)", LORA),
    Rule(F, "peft.dropout", 0.1, "peft.dropout=0.1 is LoRA's (dropout on its input): "
         "peft.method='adalora' has none", ADALORA),
    Rule(F, "peft.target_modules", "query,qkv", "unknown target modules ['qkv']", LORA),
    Rule(F, "peft.modules_to_save", "pooler,dense", "unknown modules ['dense']", LORA),
    Rule(F, "peft.modules_to_save", "pooler", "peft.modules_to_save='pooler' the ner head reads "
         "no pooler", {**LORA, **NER}),
    Rule(F, "peft.num_virtual_tokens", 0, "peft.num_virtual_tokens=0 must be > 0", PREFIX),
    Rule(F, "peft.num_virtual_tokens", 500, "peft.num_virtual_tokens=500 plus "
         "data.max_seq_length=128 exceeds the model's max_position_embeddings=512", PREFIX),
    Rule(F, "peft.reduction_factor", 0, "peft.reduction_factor=0 must be > 0", HOULSBY),
    Rule(F, "peft.init_adapter", "runs/lora", "needs peft.method: the method of its adapter"),
    Rule(F, "peft.init_adapter", "runs/ada", "cannot continue AdaLoRA", ADALORA),
    Rule(F, "data.packing", True, "data.packing=True cannot put a soft prompt", PROMPT),
    Rule(F, "peft.method", "prefix", "peft.method='prefix' cannot adapt a head-pruned model "
         "(model.pruned_heads=[[0], []]", {"init_from": "hf:base",
                                            "model.pruned_heads": ((0,), ())}),
    Rule(F, "quantize.qat", "int4", "quantize.qat='int4' must be '' (off) or one of "
         "weight_only, w8a8"),
    Rule(F, "quantize.qat", "w8a8", "quantize.qat='w8a8' trains the whole model for its int8 "
         "export: not with peft.method='lora'", LORA),
    *(Rule(F, f, 0, f"{f}=0 must be > 0", ADALORA)
      for f in ("peft.init_r", "peft.target_r", "peft.deltaT")),
    Rule(F, "peft.target_r", 16, "peft.target_r=16 exceeds peft.init_r=12", ADALORA),
    Rule(F, "peft.beta1", 1.0, "peft.beta1=1.0 must be in (0, 1)", ADALORA),
    Rule(F, "peft.beta2", 0.0, "peft.beta2=0.0 must be in (0, 1)", ADALORA),
    *(Rule(F, f, v, f"{f}={v!r} must be >= 0", ADALORA)
      for f, v in (("peft.tinit", -1), ("peft.tfinal", -1), ("peft.orth_reg_weight", -1.0))),
    Rule(PS, "peft.tfinal", 1, "peft.tfinal=1 with peft.tinit=0 leaves no budgeting phase in "
         "train.steps=1", ADALORA),
    Rule(DI, "teacher", "", "teacher is required"),
    Rule(DI, "distill.student_init", "copy", "distill.student_init='copy' must be one of"),
    Rule(DI, "distill.student_init", "init_from", "must be 'init_from' exactly when init_from"),
    Rule(DI, "distill.losses", "kl=1,attn=1", "unknown loss 'attn'"),
    Rule(DI, "distill.losses", "kl=1,task", "gives 'task' no number"),
    Rule(DI, "distill.losses", "kl=0", "needs weights >= 0, one of them > 0"),
    *_positive(DI, "distill.temperature", value=0.0),
    Rule(DI, "distill.teacher_dtype", "float16", "distill.teacher_dtype='float16' must be one of"),
    Rule(DI, "model.scan_layers", True, "must be False for the hidden loss", HIDDEN),
    Rule(DI, "model.remat_policy", "full", "must be 'none' for the hidden loss", HIDDEN),
    *_positive(DI, "distill.teacher_top_k"),
    Rule(DI, "distill.teacher_cache", "cache", "holds logits only: the hidden loss", HIDDEN),
    Rule(DI, "distill.losses", "kl=1,cosine=1", "names 'cosine', which task='classification'"),
    Rule(DI, "distill.teacher_cache", "cache", "is not for task='mlm'", {"task": "mlm"}),
    Rule(DI, "distill.relation_heads", -1, "distill.relation_heads=-1 must be >= 0"),
    Rule(DI, "distill.relation_heads", 2, "use query_relation and key_relation instead",
         {"distill.losses": "kl=1,attention=1"}),
    Rule(DI, "data.packing", True, "data.packing=True is not supported by distillation"),
    Rule(DI, "peft.method", "lora", "is not supported by distillation"),
    Rule(DI, "quantize.qat", "w8a8", "quantize.qat='w8a8' is not supported by distillation"),
    Rule(DI, "data.dev_file", "", "data.dev_file is required"),
    Rule(PR, "init_from", "", "init_from is required"),
    *(Rule(PR, f, v, f"{f}={v!r} must be in [0, 1)") for f, v in (
        ("prune.heads_share", 1.0), ("prune.ffn_share", -0.25))),
    Rule(PR, "prune.importance", "taylor", "prune.importance='taylor' must be one of gradient"),
    *_positive(PR, "prune.batches"),
    Rule(PR, "peft.method", "lora", "is not supported by pruning"),
    Rule(PR, "quantize.qat", "w8a8", "quantize.qat='w8a8' is not for pruning"),
    Rule(PR, "data.dev_file", "", "data.dev_file is required"),
    Rule(PR, "data.train_file", "", "data.train_file is required: its batches rank"),
    Rule(PR, "prune.recovery_epochs", -1.0, "prune.recovery_epochs=-1.0 must be >= 0"),
    Rule(PR, "prune.recovery", "kd", "prune.recovery='kd' must be one of finetune, distill"),
    Rule(PR, "train.epochs", 1.0, "train.epochs=1.0 is not read by pruning"),
    Rule(PR, "data.train_file", "", "data.train_file is required: the recovery trains on it",
         {"prune.recovery_epochs": 1.0}),
    *(Rule(K, f, 0, f"{f}=0 must be > 0", QA) for f in (
        "data.doc_stride", "data.max_query_length", "data.max_answer_length", "data.n_best_size")),
    Rule(K, "data.max_query_length", 126, "data.max_query_length=126 leaves no room", QA),
]


def _base(check: str):
  """A config that passes `check`: the pretraining defaults, or fine-tuning with a train file
  (distillation: and a dev file and a teacher; pruning: and a dev file and a workdir)."""
  if check == DI:
    cfg = config_lib.distill_defaults()
    cfg.teacher, cfg.data.train_file, cfg.data.dev_file = "teacher", "train.tsv", "dev.tsv"
    return cfg
  if check == PR:
    cfg = config_lib.prune_defaults()
    cfg.init_from, cfg.data.train_file, cfg.data.dev_file = "run", "train.tsv", "dev.tsv"
    return cfg
  if check not in (F, K, PS):
    return config_lib.pretrain_defaults()
  cfg = config_lib.finetune_defaults()
  cfg.data.train_file = "train.tsv"
  return cfg


def _set(cfg, dotted: str, value: Any) -> None:
  *path, field = dotted.split(".")
  node = cfg
  for part in path:
    node = node[part]
  node[field] = value


def _violate(rule: Rule) -> config_lib.ConfigError:
  cfg = _base(rule.check)
  for field, value in rule.context.items():
    _set(cfg, field, value)
  VALIDATORS[rule.check](cfg)  # the context alone is fine
  _set(cfg, rule.field, rule.value)
  with pytest.raises(config_lib.ConfigError) as caught:
    VALIDATORS[rule.check](cfg)
  return caught.value


@pytest.mark.parametrize("rule", RULES,
                         ids=[f"{r.check.split('validate_')[1]}:{r.field}={r.value!r}"
                              for r in RULES])
def test_rule(rule):
  assert rule.message in str(_violate(rule))


Site = tuple[str, str, int]  # (file, function, line)


def _raising_site(error: BaseException) -> Site:
  """The line of the innermost validate_* function from which `error` was raised."""
  frames = traceback.extract_tb(error.__traceback__)
  return next((f.filename, f.name, f.lineno) for f in reversed(frames)
              if f.name.startswith("validate_"))


def _check_name(func: ast.expr) -> str:
  """`fail` for both `fail(...)` and `config_lib.fail(...)`."""
  return func.id if isinstance(func, ast.Name) else func.attr if isinstance(
      func, ast.Attribute) else ""


def _sites() -> dict[Site, set[str]]:
  """Every check in the validate_* functions of `_MODULES` -> the fields it checks."""
  sites: dict[Site, set[str]] = {}
  for module in _MODULES:
    path = inspect.getsourcefile(module)
    for fn in ast.parse(inspect.getsource(module)).body:
      if not (isinstance(fn, ast.FunctionDef) and fn.name.startswith("validate_")):
        continue
      loops = {id(node): loop for loop in ast.walk(fn) if isinstance(loop, ast.For)
               for node in ast.walk(loop)}
      for node in ast.walk(fn):
        if isinstance(node, ast.Raise):
          sites[(path, fn.name, node.lineno)] = set()
        elif isinstance(node, ast.Call) and _check_name(node.func) in _CHECKS:
          sites[(path, fn.name, node.lineno)] = _checked_fields(node, loops.get(id(node)))
  return sites


def _checked_fields(call: ast.Call, loop: ast.For | None) -> set[str]:
  """The dotted fields a check call names, directly or through the loop it sits in."""
  literal = {a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
             and "." in a.value}
  if literal or loop is None:
    return literal
  names = {c.value for c in ast.walk(loop.iter)
           if isinstance(c, ast.Constant) and isinstance(c.value, str)}
  first = call.args[0]
  prefix = (first.values[0].value if isinstance(first, ast.JoinedStr)
            and isinstance(first.values[0], ast.Constant) else "")
  return {prefix + name for name in names}


def test_every_rule_has_a_row():
  sites = _sites()
  hit: dict[Site, set[str]] = {}
  for rule in RULES:
    hit.setdefault(_raising_site(_violate(rule)), set()).add(rule.field)
  missing = {site: fields - hit.get(site, set()) for site, fields in sites.items()
             if site not in hit or fields - hit[site]}
  assert not missing, f"validation checks without a row in RULES (file, function, line): {missing}"


def _cli(*args: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "jaxfm.pretrain",
                           "--config=configs/pretrain/bert_tiny_cpu.py", *args],
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ,
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
  try:
    out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
  finally:
    proc.kill()
  return proc.returncode, out


def test_cli_refuses_typos_changed_configs_and_unwritable_workdirs(tmp_path):
  """Through `python -m jaxfm.pretrain` (absl config_flags), three launches in parallel."""
  changed = tmp_path / "changed"
  changed.mkdir()
  cli_config = runpy.run_path(str(ROOT / "configs" / "pretrain" / "bert_tiny_cpu.py"))
  workdir_lib.write_resolved_config(str(changed), cli_config["get_config"]())
  (tmp_path / "a_file").write_text("")
  unwritable = tmp_path / "a_file" / "workdir"
  procs = {
      "typo": _cli("--config.train.stepz=3", f"--workdir={tmp_path / 'typo'}"),
      "changed": _cli("--config.optim.peak_learning_rate=0.5", f"--workdir={changed}"),
      "unwritable": _cli(f"--workdir={unwritable}"),
  }
  results = {name: _finish(proc) for name, proc in procs.items()}
  rc, out = results["typo"]
  assert rc != 0 and "stepz" in out and "Did you mean" in out and "steps" in out, out[-2000:]
  rc, out = results["changed"]
  assert rc == 1 and "--allow_config_change" in out, out[-2000:]
  assert "optim.peak_learning_rate: 0.002 -> 0.5" in out
  rc, out = results["unwritable"]
  assert rc == 1 and f"workdir {unwritable} is not writable" in out, out[-2000:]
  assert "compile" not in out  # refused before any device work


def test_changed_config_is_accepted_when_allowed(tmp_path):
  cfg = config_lib.pretrain_defaults()
  workdir_lib.write_resolved_config(str(tmp_path), cfg)
  cfg.optim.peak_learning_rate = 0.5
  with pytest.raises(workdir_lib.WorkdirError, match=r"optim.peak_learning_rate: 0.001 -> 0.5"):
    workdir_lib.prepare_workdir(str(tmp_path), cfg, allow_config_change=False)
  workdir_lib.prepare_workdir(str(tmp_path), cfg, allow_config_change=True)
  cfg.train.steps = 5000  # a resumable change needs no permission
  cfg.optim.peak_learning_rate = 1e-3
  workdir_lib.prepare_workdir(str(tmp_path), cfg, allow_config_change=False)
  assert json.loads((tmp_path / "config.json").read_text())["config"]["train"]["steps"] == 1000


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory modes")
def test_read_only_workdir_is_refused(tmp_path):
  tmp_path.chmod(0o555)
  try:
    with pytest.raises(workdir_lib.WorkdirError, match="is not writable"):
      workdir_lib.prepare_workdir(str(tmp_path), config_lib.pretrain_defaults(), False)
  finally:
    tmp_path.chmod(0o755)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in
                                        (ROOT / "configs").glob("*/*.py")))
def test_every_shipped_config_loads_and_its_model_mesh_and_optimizer_validate(path):
  cfg = config_lib.recipe(str(ROOT / path), os.path.basename(path))
  for check in (config_lib.validate_model, config_lib.validate_mesh, config_lib.validate_optim):
    check(cfg)
