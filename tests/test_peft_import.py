"""A huggingface/peft LoRA folder imported as a jaxfm workdir (`convert --from_peft`): the same
logits as peft's model, a workdir that evaluate scores and --to_peft writes back; what jaxfm's
LoRA cannot express is refused by name."""

import numpy as np
import pytest
import safetensors.numpy

from jaxfm import config as config_lib
from jaxfm import workdir as workdir_lib
from jaxfm.finetuning import run
from jaxfm.trees import flatten
from tests import finetune_fixtures as ff
from tests.test_peft import _cli, _inputs, _jaxfm_logits, _torch_logits, files  # noqa: F401

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft_lib = pytest.importorskip("peft")


def _peft_folder(files, out, config, architecture="BertForSequenceClassification", labels=2):
  """A peft adapter of `config` over the tiny base with every trainable tensor randomised, saved
  to `out`; returns the PeftModel (eval mode)."""
  torch.manual_seed(0)
  base = getattr(transformers, architecture).from_pretrained(str(files / "hf_base"),
                                                             num_labels=labels)
  model = peft_lib.get_peft_model(base, config)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for _, param in model.named_parameters():
      if param.requires_grad:
        param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
  model.save_pretrained(str(out))
  return model.eval()


@pytest.fixture(scope="module")
def imported(files, tmp_path_factory):
  root = tmp_path_factory.mktemp("peft_import")
  config = peft_lib.LoraConfig(
      task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.1, use_rslora=True,
      target_modules=["query", "value", "attention.output.dense", "intermediate.dense"],
      modules_to_save=["pooler"])  # the tiny base has no pooler: transformers draws one
  model = _peft_folder(files, root / "adapter", config)
  done = _cli("jaxfm.convert", f"--from_peft={root / 'adapter'}", f"--base={files / 'hf_base'}",
              f"--out={root / 'workdir'}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "imported a LORA adapter" in done.stdout
  return model, str(root / "workdir"), root


def test_imported_workdir_gives_peft_logits(imported):
  model, workdir, _ = imported
  cfg = workdir_lib.read_config(workdir)
  assert (cfg.task, cfg.peft.method, cfg.peft.rank, cfg.peft.alpha, cfg.peft.rslora,
          cfg.peft.dropout) == ("classification", "lora", 4, 8.0, True, 0.1)
  assert cfg.peft.target_modules == "query,value,attention.output,intermediate"
  inputs = _inputs(workdir_lib.read_model_config(workdir).vocab_size)
  ours = _jaxfm_logits(workdir, inputs)
  np.testing.assert_allclose(ours, _torch_logits(model, inputs), atol=1e-4)
  with model.disable_adapter():
    assert np.abs(_torch_logits(model, inputs) - ours).max() > 1e-3  # the adapter acts


def test_imported_workdir_evaluates_and_exports_back(imported, files):
  model, workdir, root = imported
  _, dev = ff.write_sentiment(files)
  metrics = run.evaluate(workdir, "dev", dev)
  assert 0.0 <= metrics["accuracy"] <= 1.0 and np.isfinite(metrics["loss"])
  done = _cli("jaxfm.convert", "--to_peft", f"--from={workdir}", f"--out={root / 'back'}")
  assert done.returncode == 0, done.stderr[-3000:]
  original = safetensors.numpy.load_file(str(root / "adapter" / "adapter_model.safetensors"))
  back = safetensors.numpy.load_file(str(root / "back" / "adapter_model.safetensors"))
  assert sorted(back) == sorted(original)
  for key, value in original.items():
    np.testing.assert_allclose(back[key], value, atol=1e-7, err_msg=key)
  trained = flatten(run.adapted(workdir).trainable["adapter"])
  assert trained["encoder/layer_0/query/lora_a"].shape == (128, 4)


def _continuing(imported, files, **peft_fields):
  """A LoRA fine-tuning config over the imported adapter's base, starting from that adapter."""
  _, workdir, _ = imported
  saved = workdir_lib.read_config(workdir)
  cfg = ff.config("classification", saved.init_from, *ff.write_sentiment(files), epochs=1.0)
  cfg.peft.update(method="lora", rank=4, alpha=8.0, rslora=True,
                  target_modules=saved.peft.target_modules, init_adapter=workdir)
  cfg.peft.update(peft_fields)
  return cfg


def test_fine_tuning_continues_from_an_imported_adapter(imported, files):
  _, workdir, root = imported
  start = run.evaluate(workdir, "dev", ff.write_sentiment(files)[1])
  cfg = _continuing(imported, files)
  cfg.optim.peak_learning_rate = 1e-9  # the adapter and head barely move: scores stay
  result, _ = run.finetune(cfg, str(root / "continued"))
  assert result.eval["loss"] == pytest.approx(start["loss"], rel=1e-5)
  assert result.eval["accuracy"] == start["accuracy"]
  assert workdir_lib.read_config(str(root / "continued")).peft.init_adapter == workdir


def test_an_adapter_is_continued_only_as_it_was_trained(imported, files, tmp_path):
  _, workdir, _ = imported
  with pytest.raises(config_lib.ConfigError,
                     match=r"peft.rank=2 differs from the adapter at peft.init_adapter=.*rank=4"):
    run.finetune(_continuing(imported, files, rank=2), str(tmp_path / "rank2"))
  cfg = _continuing(imported, files, init_adapter="")
  cfg.init_from = workdir  # a PEFT workdir holds no base: the error says what to do instead
  cfg.peft.method = ""
  with pytest.raises(config_lib.ConfigError, match=(
      rf"init_from={workdir} is a parameter-efficient run .*init_from=hf:.* with "
      rf"peft.init_adapter={workdir}; to start from its merged model: .*--to_hf")):
    run.finetune(cfg, str(tmp_path / "full"))


def test_token_classification_imports_with_its_label_names(files, tmp_path):
  config = peft_lib.LoraConfig(task_type="TOKEN_CLS", r=2, lora_alpha=4,
                               target_modules=["key", "output.dense"])
  model = _peft_folder(files, tmp_path / "adapter", config, "BertForTokenClassification", 3)
  workdir = tmp_path / "workdir"
  args = (f"--from_peft={tmp_path / 'adapter'}", f"--base={files / 'hf_base'}", f"--out={workdir}")
  done = _cli("jaxfm.convert", *args, "--labels=O,B-PER")
  assert done.returncode == 1 and "--labels names 2 labels; the adapter's head has 3" in done.stderr
  done = _cli("jaxfm.convert", *args, "--labels=O,B-PER,I-PER")
  assert done.returncode == 0, done.stderr[-3000:]
  assert workdir_lib.label_names(str(workdir)) == ["O", "B-PER", "I-PER"]
  # 'output.dense' is peft's suffix match: the attention output and the FFN output.
  assert workdir_lib.read_config(str(workdir)).peft.target_modules == "key,attention.output,output"
  inputs = _inputs(workdir_lib.read_model_config(str(workdir)).vocab_size)
  np.testing.assert_allclose(_jaxfm_logits(str(workdir), inputs), _torch_logits(model, inputs),
                             atol=1e-4)


@pytest.mark.parametrize("config,refusal", [
    (lambda: peft_lib.LoHaConfig(task_type="SEQ_CLS", r=2, target_modules=["query"]),
     "peft_type 'LOHA' is not supported: only LORA adapters import"),
    (lambda: peft_lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["word_embeddings"]),
     "tensor bert.embeddings.word_embeddings.lora_embedding_A"),
    (lambda: peft_lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["key"],
                                 layers_to_transform=[0]),
     "layers_to_transform=[0] is not supported"),
    (lambda: peft_lib.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query"],
                                 use_dora=True),
     "use_dora=True is not supported"),
])
def test_what_jaxfm_lora_cannot_express_is_refused_by_name(config, refusal, files, tmp_path):
  _peft_folder(files, tmp_path / "adapter", config())
  done = _cli("jaxfm.convert", f"--from_peft={tmp_path / 'adapter'}",
              f"--base={files / 'hf_base'}", f"--out={tmp_path / 'workdir'}")
  assert done.returncode == 1
  assert refusal in done.stderr, done.stderr[-3000:]
  assert not (tmp_path / "workdir").exists()
