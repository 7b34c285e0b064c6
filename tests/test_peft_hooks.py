"""PEFT methods that act on activations through the encoder's hooks (`encoder/peft`): prompt
tuning, prefix tuning and bottleneck adapters. Prompt and prefix tuning are checked against
huggingface/peft on transformers' BERT; adapters, which peft lacks, against transformers' BERT
with an independent torch adapter spliced in.
"""

import json
import pathlib

import jax
import numpy as np
import pytest

from jaxfm import interop, peft, sharding
from jaxfm import workdir as workdir_lib
from jaxfm.data.tokenizer import load_tokenizer
from jaxfm.finetuning import run
from jaxfm.models import BertForSequenceClassification, BertForTokenClassification, preset
from jaxfm.trees import flatten
from tests import finetune_fixtures as ff
from tests.test_peft import _cli, _config, _torch_logits, files  # noqa: F401 (fixture)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VIRTUAL = 4


def _task_model(kind, labels=3, **config):
  config = preset("tiny", **{**dict(vocab_size=40, max_position_embeddings=32, hidden_dropout=0.0,
                                    attention_dropout=0.0, num_layers=3), **config})
  model = (BertForSequenceClassification if kind == "sequence" else BertForTokenClassification)(
      config, labels)
  ids = np.zeros((1, 8), np.int32)
  params = sharding.unbox(model.init(jax.random.key(0), ids, ids, np.ones_like(ids))["params"])
  plan_base = frozenset(n for n in flatten(params) if not n.startswith("classifier"))
  return config, model, jax.device_get(params), plan_base


def _inputs(rows=3, length=10, vocab=40):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, vocab, (rows, length)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, 6:] = 1
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  return ids, types, mask


def _randomised(tree, seed):
  """Every leaf of `tree` replaced by N(0, 0.1) draws (so zero-initialised parts act too)."""
  leaves, structure = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(structure, [rng.normal(0, 0.1, np.shape(x)).astype(np.float32)
                                        for x in leaves])


def _hf_model(params, config, kind, tmp_path, labels=3):
  interop.export_hf(params, config, str(tmp_path / "hf"), None, [str(i) for i in range(labels)])
  architecture = (transformers.BertForSequenceClassification if kind == "sequence"
                  else transformers.BertForTokenClassification)
  return architecture.from_pretrained(str(tmp_path / "hf")).eval()


class TorchAdapter(torch.nn.Module):
  """x + up(gelu(down(x))), written from the paper, weights given as jaxfm's [in, out]."""

  def __init__(self, params, layer):
    super().__init__()
    self.w = {k: torch.tensor(np.asarray(v[layer])) for k, v in params.items()}

  def forward(self, x):
    h = torch.nn.functional.gelu(x @ self.w["down_kernel"] + self.w["down_bias"])
    return x + h @ self.w["up_kernel"] + self.w["up_bias"]


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("kind,scan", [("sequence", False), ("token", True)])
def test_adapters_match_transformers_bert_with_a_torch_adapter(method, kind, scan, tmp_path):
  config, model, params, base = _task_model(kind, scan_layers=scan)
  plan = peft.Plan(peft.Settings(method, reduction_factor=8), base)
  trainable = plan.trainable(params, jax.random.key(1))
  inputs = _inputs()
  plain = np.asarray(model.apply({"params": params}, *inputs))
  # Zero up-projections: the base model's outputs, exactly.
  started = np.asarray(model.apply({"params": plan.combine(trainable, plan.frozen(params))},
                                   *inputs))
  np.testing.assert_array_equal(started, plain)
  adapter = _randomised(trainable["adapter"], seed=2)
  assert adapter["output_adapter"]["down_kernel"].shape == (3, 128, 16)  # hidden / 8
  ours = np.asarray(model.apply({"params": plan.combine({**trainable, "adapter": adapter},
                                                        plan.frozen(params))}, *inputs))
  assert np.abs(ours - plain).max() > 1e-3
  # Reference: transformers' BERT with the adapter after each sublayer's dropout (identity in
  # eval), before its residual LayerNorm.
  reference = _hf_model(params, config, kind, tmp_path)
  for i, layer in enumerate(reference.bert.encoder.layer):
    if "attention_adapter" in adapter:
      layer.attention.output.dropout = TorchAdapter(adapter["attention_adapter"], i)
    layer.output.dropout = TorchAdapter(adapter["output_adapter"], i)
  assert "attention_adapter" in adapter or method == "pfeiffer"
  np.testing.assert_allclose(_torch_logits(reference, inputs), ours, atol=1e-5)


def _prefix_cache(prefix_table, config, batch):
  """peft's `get_prompt` for PREFIX_TUNING: the table [virtual, layers*2*hidden] as a
  transformers cache (layer i: key row block 2i, value 2i+1)."""
  past = torch.tensor(np.asarray(prefix_table)).expand(batch, -1, -1).reshape(
      batch, VIRTUAL, config.num_layers * 2, config.num_heads, config.head_dim)
  past = past.permute([2, 0, 3, 1, 4]).split(2)
  cache = transformers.DynamicCache()
  for i, (key, value) in enumerate(past):
    cache.update(key, value, i)
  return cache


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_on_token_classification_matches_transformers_cache(projection, tmp_path):
  """NER: the prefix as transformers' BERT takes cached keys and values (peft's own token
  classification cannot pass them)."""
  config, model, params, base = _task_model("token")
  plan = peft.Plan(peft.Settings("prefix", num_virtual_tokens=VIRTUAL,
                                 prefix_projection=projection), base)
  trainable = plan.trainable(params, jax.random.key(1))
  inputs = _inputs()
  ours = np.asarray(model.apply({"params": plan.combine(trainable, plan.frozen(params))}, *inputs))
  reference = _hf_model(params, config, "token", tmp_path)
  ids, types, mask = (torch.tensor(x, dtype=torch.long) for x in inputs)
  extended = torch.cat([torch.ones(len(ids), VIRTUAL, dtype=torch.long), mask], 1)
  with torch.no_grad():
    hidden = reference.bert(input_ids=ids, token_type_ids=types, attention_mask=extended,
                            cache=_prefix_cache(
                                peft.prefix.table(trainable["adapter"]), config, len(ids)))[0]
    np.testing.assert_allclose(reference.classifier(hidden).numpy(), ours, atol=1e-5)
  assert np.abs(ours - np.asarray(model.apply({"params": params}, *inputs))).max() > 1e-3


def test_prompt_starts_from_the_init_text_words(files):
  tokenizer = load_tokenizer(str(files / "hf_base"), lowercase=True)
  config, model, params, base = _task_model("sequence", vocab_size=tokenizer.vocab_size)
  ids = tokenizer.encode_batch(["good movie"])[0]
  assert len(ids) == 2
  plan = peft.Plan(peft.Settings("prompt", num_virtual_tokens=5, prompt_init_text="good movie"),
                   base, tokenizer)
  prompt = plan.trainable(params, jax.random.key(1))["adapter"]["prompt"]
  table = params["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(prompt, table[[*ids, *ids, ids[0]]])


def _hooked_run(files, method, **fields):
  cfg = _config(files, "classification", ff.write_sentiment, method, epochs=3.0,
                num_virtual_tokens=VIRTUAL, **fields)
  cfg.data.max_seq_length = ff.SEQ - VIRTUAL  # the virtual tokens take the first positions
  workdir = files / method
  result, _ = run.finetune(cfg, str(workdir))
  return str(workdir), result


@pytest.fixture(scope="module")
def prompt_run(files):
  return _hooked_run(files, "prompt", prompt_init_text="the movie was")


@pytest.fixture(scope="module")
def prefix_run(files):
  return _hooked_run(files, "prefix", prefix_projection=True)


def _jaxfm_logits(workdir, inputs):
  parts = run.adapted(workdir)
  model = BertForSequenceClassification(workdir_lib.read_model_config(workdir),
                                        len(parts.run.label_names))
  return np.asarray(model.apply({"params": parts.merged()}, *inputs)), parts


def _exported(files, workdir, out):
  peft_lib = pytest.importorskip("peft")
  done = _cli("jaxfm.convert", "--to_peft", f"--from={workdir}", f"--out={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  base = transformers.BertForSequenceClassification.from_pretrained(
      str(files / "hf_base"), num_labels=len(workdir_lib.label_names(workdir)))
  return peft_lib.PeftModel.from_pretrained(base, str(out)).eval()


def test_prompt_tuning_trains_saves_only_the_prompt_and_head(prompt_run):
  workdir, _ = prompt_run
  parts = run.adapted(workdir)
  assert {k: v.shape for k, v in flatten(parts.trainable["adapter"]).items()} == {
      "prompt": (VIRTUAL, 128)}
  # evaluate rebuilds base + prompt from the best checkpoint: the score it had in training.
  best_step = int(next((pathlib.Path(workdir) / "best").iterdir()).name)
  at_best = [r for r in map(json.loads, open(pathlib.Path(workdir) / "metrics.jsonl"))
             if r["split"] == "eval" and r["step"] == best_step]
  assert run.evaluate(workdir, "dev")["accuracy"] == pytest.approx(at_best[-1]["accuracy"])
  for step in (pathlib.Path(workdir) / "checkpoints").iterdir():
    saved = (step / "state" / "_METADATA").read_text()
    assert "prompt" in saved and "qkv_kernel" not in saved and "word_embeddings" not in saved


def test_prompt_tuning_exports_to_peft_with_the_same_logits(prompt_run, files, tmp_path):
  workdir, _ = prompt_run
  inputs = _row_inputs()
  ours, parts = _jaxfm_logits(workdir, inputs)
  model = _exported(files, workdir, tmp_path / "adapter")
  np.testing.assert_allclose(_torch_logits(model, inputs), ours, atol=1e-4)
  # Trained away from its init text's embeddings.
  ids = parts.run.tokenizer.encode_batch(["the movie was"])[0]
  table = parts.frozen["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  start = table[(ids * VIRTUAL)[:VIRTUAL]]
  assert np.abs(np.asarray(parts.trainable["adapter"]["prompt"]) - start).max() > 1e-3


def test_a_prompt_run_has_no_merged_form_and_says_to_export_it_to_peft(prompt_run, tmp_path):
  workdir, _ = prompt_run
  done = _cli("jaxfm.convert", "--to_hf", f"--from={workdir}", f"--out={tmp_path / 'hf'}")
  assert done.returncode == 1, done.stderr[-3000:]
  assert "peft.method='prompt' adds to the model" in done.stderr and "--to_peft" in done.stderr
  assert "Traceback" not in done.stderr and not (tmp_path / "hf").exists()


def _row_inputs():
  """Rows of the fixture's vocabulary, starting with [CLS], one padded."""
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 30, (3, 12)).astype(np.int32)
  ids[:, 0] = 2  # [CLS]
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  return ids, np.zeros_like(ids), mask


def test_prefix_tuning_exports_to_peft_with_the_same_logits(prefix_run, files, tmp_path):
  """peft's PREFIX_TUNING adapter as `PeftModel.from_pretrained` loads it, run the way peft's
  sequence classifier runs it (its own forward refuses transformers 5's BERT, whose forward no
  longer names `past_key_values`): get_prompt's cache into `bert`, the pooled output, the
  classifier."""
  workdir, _ = prefix_run
  inputs = _row_inputs()
  ours, parts = _jaxfm_logits(workdir, inputs)
  model = _exported(files, workdir, tmp_path / "adapter")
  assert model.peft_config["default"].peft_type == "PREFIX_TUNING"
  ids, types, mask = (torch.tensor(x, dtype=torch.long) for x in inputs)
  with torch.no_grad():
    cache = model.get_prompt(batch_size=len(ids))
    extended = torch.cat([torch.ones(len(ids), VIRTUAL, dtype=torch.long), mask], 1)
    bert = model.base_model.bert
    pooled = bert(input_ids=ids, token_type_ids=types, attention_mask=extended,
                  cache=cache)[1]
    logits = model.base_model.classifier(model.base_model.dropout(pooled)).numpy()
  np.testing.assert_allclose(logits, ours, atol=1e-4)
  assert set(flatten(parts.trainable["adapter"])) == {
      "embedding", "mlp/kernel_0", "mlp/bias_0", "mlp/kernel_1", "mlp/bias_1"}
