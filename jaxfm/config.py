"""Default experiment configuration and `validate(cfg)`.

Config files under `configs/` start from `pretrain_defaults()` (or
`finetune_defaults()`), change what they need and return the result; absl's
`config_flags` loads them locked, so an override naming a field that does not
exist fails with a "did you mean" suggestion.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re

import ml_collections

from jaxfm import peft
from jaxfm.compress import MODES as INT8_MODES
from jaxfm.models.config import ACTIVATIONS, COMPUTE_DTYPES, REMAT_POLICIES, BertConfig, preset


PLATFORMS = ("auto", "tpu", "gpu", "cpu")  # runtime.platform


class ConfigError(ValueError):
  """A configuration value is out of range or inconsistent with another field."""


# The `model` fields that make the architecture: a fine-tuning run takes them from its init_from
# checkpoint (dropout, dtype, scan, remat and the CPU paths stay as configured).
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads",
                       "intermediate_size", "max_position_embeddings", "type_vocab_size",
                       "embedding_size", "hidden_act", "layer_norm_eps")


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """The `model` section for a named size preset (see `jaxfm.models.PRESETS`)."""
  # auto: `jaxfm.cpu`'s XLA:CPU paths exactly when the run's devices are CPUs; on | off.
  cpu_paths = overrides.pop("cpu_paths", "auto")
  fields = dataclasses.asdict(preset(name, **overrides))
  # ConfigDict needs a concrete type for fields that may be None.
  fields["embedding_size"] = fields["embedding_size"] or 0
  # Only a pruned model's section has it (`set_pruned_heads`): configs saved before it existed
  # resume unchanged.
  del fields["pruned_heads"]
  fields["cpu_paths"] = cpu_paths
  return ml_collections.ConfigDict(fields)


def set_pruned_heads(cfg: ml_collections.ConfigDict, source: BertConfig) -> None:
  """Copies a structurally pruned `source`'s `pruned_heads` into `cfg.model` (nothing for an
  unpruned one), beside the `ARCHITECTURE_FIELDS` a run takes from its checkpoint."""
  with cfg.unlocked():
    if source.pruned_heads:
      cfg.model.pruned_heads = source.pruned_heads
    elif "pruned_heads" in cfg.model:
      del cfg.model["pruned_heads"]


def take_architecture(cfg: ml_collections.ConfigDict, source: BertConfig,
                      fields: tuple[str, ...] = ARCHITECTURE_FIELDS) -> None:
  """Copies `source`'s architecture `fields` into `cfg.model`, and its pruned heads
  (`set_pruned_heads`): a run takes the architecture of the checkpoint it starts from."""
  with cfg.unlocked():
    for field in fields:
      cfg.model[field] = getattr(source, field) or 0  # embedding_size None -> 0
  set_pruned_heads(cfg, source)


def recipe(config_file: str, name: str) -> ml_collections.ConfigDict:
  """`get_config()` of the config file `name` beside `config_file`: a config that varies another
  recipe loads it instead of copying it (config files are loaded by path, not as a package)."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(name).stem,
                                                pathlib.Path(config_file).with_name(name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def use_cpu_paths(cfg: ml_collections.ConfigDict, platform: str | None) -> bool:
  """Whether a run on `platform` devices ('cpu', 'tpu', 'gpu'; None: no devices, e.g. an
  export) takes `jaxfm.cpu`'s paths: `model.cpu_paths` 'on', or 'auto' on CPUs."""
  setting = cfg.model.get("cpu_paths", "auto")
  return setting == "on" or (setting == "auto" and platform == "cpu")


def bert_config(cfg: ml_collections.ConfigDict, platform: str | None) -> BertConfig:
  """The model's dataclass from a config's `model` section (also a saved config.json's), for a
  run on `platform` devices (see `use_cpu_paths`)."""
  return BertConfig.from_mapping({**cfg.model, "embedding_size": cfg.model.get("embedding_size")
                                  or None, "cpu_paths": use_cpu_paths(cfg, platform)})


def pretrain_defaults() -> ml_collections.ConfigDict:
  """Every pretraining field with its default; config files override a few."""
  cfg = ml_collections.ConfigDict()
  cfg.model = model_config("tiny")
  cfg.init_from = ""  # '' | a jaxfm workdir/checkpoint dir | 'hf:/path/to/folder'
  cfg.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  # The backend the run must come up on: 'auto' takes whatever JAX finds; 'tpu' | 'gpu' | 'cpu'
  # stop at start-up with JAX's reason when it is not there (JAX falls back to CPU quietly).
  cfg.runtime = ml_collections.ConfigDict(dict(platform="auto"))
  cfg.data = _pretrain_data_defaults()
  cfg.optim = _optim_defaults()
  cfg.train = _train_defaults()
  return cfg


def _pretrain_data_defaults() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.train_files = ""  # '' = the embedded default corpus; else comma-separated globs
  # '' = read, tokenise and pack the corpus at start-up; else a folder written by
  # `python -m jaxfm.prepare` from this config, read by index (the corpus fields are then
  # unused; the packing and tokenizer fields must match its manifest).
  data.prepared = ""
  # A mixture instead of train_files: ((name, comma-separated globs, weight), ...). Each
  # source's share of the training examples is its weight (normalised), whatever its size.
  data.sources = ()
  # With data.prepared: a shard whose files fail the start-up check is skipped (its rows read
  # the next good shard), logged and counted, instead of stopping the run.
  data.skip_bad_shards = False
  data.format = "text"  # text | jsonl | tfds
  data.text_field = "text"  # JSONL field holding the document text
  data.documents = "blank_line"  # blank_line | line: how documents are separated in text
  data.tfds_name = ""  # e.g. 'wikipedia/20230601.en' with format=tfds
  data.tfds_data_dir = ""
  data.on_decode_error = "error"  # error | skip | replace
  data.eval_fraction = 0.02  # share of documents held out for evaluation
  data.tokenizer = ""  # '' = train a WordPiece vocab on the corpus; else vocab.txt/tokenizer.json
  data.vocab_size = 8192  # only when training a tokenizer
  data.lowercase = True
  data.max_seq_length = 128
  data.max_predictions_per_seq = 20
  data.mask_prob = 0.15
  data.whole_word_masking = False
  # Chinese: '' (BERT's rule: every CJK character is a word) | 'jieba' (segmented words are
  # masked whole, as Chinese-BERT-wwm; needs whole_word_masking and `pip install 'jaxfm[zh]'`),
  # with an optional jieba user dictionary (`WORD [FREQ [POS]]` lines).
  data.word_segmenter = ""
  data.word_segmenter_dict = ""
  data.worker_count = 1  # background loader processes (0 = in the main process)
  # Corpus shards: a host reads only the shards its rows of the global batch come from, and
  # the global batch does not depend on the host count. Divides train.batch_size; on a pod,
  # the host count or a multiple of it (a shard is whole files when there are enough).
  data.num_shards = 1
  data.seed = 0
  return data


def _optim_defaults() -> ml_collections.ConfigDict:
  optim = ml_collections.ConfigDict()
  optim.name = "adamw"  # adamw | lamb
  optim.peak_learning_rate = 1e-3
  optim.warmup_steps = 100
  optim.decay = "linear"  # linear | cosine | constant
  optim.end_learning_rate_factor = 0.0
  optim.weight_decay = 0.01
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-6
  optim.clip_norm = 1.0  # 0 disables global-norm clipping
  return optim


def _train_defaults() -> ml_collections.ConfigDict:
  train = ml_collections.ConfigDict()
  train.steps = 1000
  train.batch_size = 32  # global, across all hosts and accumulation micro-steps
  train.grad_accum_steps = 1
  train.seed = 0
  train.log_every = 50
  train.eval_every = 500
  train.eval_batches = 10
  train.eval_at_start = True  # also evaluate the initial params (step 0)
  train.checkpoint_every = 500
  train.checkpoint_every_seconds = 0  # 0 disables the wall-clock interval
  # 'START,STOP', e.g. '10,15': a jax.profiler trace of the steps after START up to STOP, beside
  # the TensorBoard events (WORKDIR/tensorboard/plugins/profile); '' = none.
  train.profile_steps = ""
  train.keep_checkpoints = 3
  train.keep_every = 0  # > 0: also keep every step divisible by this forever (0 = off)
  # Async saves overlap the write with training, so a kill during one loses up to
  # 2 * checkpoint_every steps; False commits each save first (at most checkpoint_every).
  train.async_checkpointing = True
  train.skip_nonfinite = True  # skip updates whose gradients are not finite
  train.max_consecutive_nonfinite = 10
  train.progress_bar = True
  train.wandb_project = ""  # '' disables Weights & Biases
  return train


def finetune_defaults() -> ml_collections.ConfigDict:
  """Every fine-tuning field with its default; configs/finetune/*.py override a few.

  With `init_from`, the architecture fields of `model` are replaced by the checkpoint's
  (dropout, dtype, scan and remat stay as configured). `train.steps`, `train.eval_every`,
  `train.checkpoint_every`, `train.eval_batches` and `optim.warmup_steps` are resolved from
  the data (`epochs`, once per epoch, the dev set size, `warmup_ratio`) before validation.
  """
  cfg = pretrain_defaults()
  cfg.task = "classification"  # a key of jaxfm.tasks.TASKS: classification, regression, ner, qa
  cfg.model.hidden_dropout = 0.1
  cfg.model.attention_dropout = 0.1

  cfg.data = _finetune_data_defaults()
  cfg.optim.peak_learning_rate = 3e-5
  cfg.optim.warmup_steps = 0
  cfg.optim.warmup_ratio = 0.1  # > 0 overrides warmup_steps: this share of train.steps
  cfg.optim.layer_decay = 1.0  # < 1: layer-wise learning-rate decay
  cfg.optim.weight_decay = 0.01

  cfg.train.epochs = 3.0  # > 0: train.steps = epochs over the training examples
  cfg.train.steps = 1
  cfg.train.eval_every = 0  # 0 = once per epoch
  cfg.train.eval_batches = 0  # resolved: the whole dev set (0 without one)
  cfg.train.eval_at_start = False  # the pretrained encoder under a random head: not worth a pass
  cfg.train.checkpoint_every = 0  # 0 = at every evaluation
  cfg.train.log_every = 10
  cfg.train.best_metric = ""  # '' = the task's main metric
  cfg.train.best_mode = "max"  # max | min
  cfg.train.early_stopping_patience = 0  # evaluations without improvement; 0 = off
  cfg.peft = _peft_defaults()
  # Quantization-aware fine-tuning: '' = off; weight_only | w8a8 = the train and eval steps run
  # the model as `jaxfm.quantize --mode=` that mode runs its int8 export (`jaxfm.compress.qat`).
  cfg.quantize = ml_collections.ConfigDict(dict(qat=""))
  return cfg


def _peft_defaults() -> ml_collections.ConfigDict:
  """Parameter-efficient fine-tuning (`jaxfm.peft`): only the adapter and the new head train."""
  p = ml_collections.ConfigDict()
  # '' = full fine-tuning; lora | adalora | ia3 | prompt | prefix | houlsby | pfeiffer
  p.method = ""
  p.rank = 8  # lora: r
  p.alpha = 8.0  # lora: the update is scaled by alpha / rank (alpha / sqrt(rank) with rslora)
  p.rslora = False
  p.dropout = 0.0  # lora: dropout on the LoRA path's input (peft's lora_dropout)
  # Comma-separated: query, key, value, attention.output, intermediate, output; or all-linear.
  # '' = the method's default (lora: query,value; ia3: key,value,output), as in peft.
  p.target_modules = ""
  # Comma-separated base modules that train in full beside the adapter, as peft's
  # modules_to_save: '' or pooler (what a sequence classifier reads; full fine-tuning trains it).
  p.modules_to_save = ""
  p.num_virtual_tokens = 20  # prompt, prefix: virtual tokens before the row / in every layer
  p.prompt_init_text = ""  # prompt: start from these words' embeddings ('' = sampled tokens)
  p.prefix_projection = False  # prefix: reparameterise the prefix through peft's MLP
  p.reduction_factor = 16  # houlsby, pfeiffer: the bottleneck is hidden_size / reduction_factor
  # adalora, with peft's AdaLoraConfig names: each site starts at rank init_r; the total rank
  # falls (cubic, every deltaT steps) from step tinit to train.steps - tfinal, to target_r per
  # site on average; beta1, beta2: the importance EMAs; orth_reg_weight: the orthogonality
  # regulariser's weight in the loss (0 = off). alpha and target_modules as for lora.
  p.init_r = 12
  p.target_r = 8
  p.tinit = 0
  p.tfinal = 0
  p.deltaT = 1
  p.beta1 = 0.85
  p.beta2 = 0.85
  p.orth_reg_weight = 0.5
  p.base_sha256 = ""  # resolved: the frozen base's content hash; a changed base is refused
  # A PEFT workdir (trained here or `convert --from_peft`) whose adapter, and head when the
  # labels agree, this run starts from instead of a fresh one: same method, shape and base.
  p.init_adapter = ""
  return p


def _finetune_data_defaults() -> ml_collections.ConfigDict:
  data = ml_collections.ConfigDict()
  data.train_file = ""  # TSV/CSV/JSONL (classification), CoNLL (ner), SQuAD JSON (qa)
  data.dev_file = ""
  data.test_file = ""
  data.tfds_name = ""  # classification from tfds instead of files, e.g. 'glue/sst2'
  data.tfds_data_dir = ""
  data.train_split = "train"
  data.dev_split = "validation"
  data.test_split = "test"
  data.format = ""  # '' = from the file extension (tsv, csv, jsonl)
  data.has_header = True
  data.text_fields = "sentence"  # comma-separated: one field, or two for sentence pairs
  data.label_field = "label"
  data.tag_column = -1  # ner: the CoNLL column holding the tag
  data.tag_scheme = "iob2"  # ner: iob2 | iob1 | bioes (normalised to IOB2)
  data.all_subwords = False  # ner: label every sub-word, not only the first
  data.stride = -1  # ner: tokens shared by windows of a long sentence (-1 = a quarter)
  data.doc_stride = 128  # qa
  data.max_query_length = 64  # qa
  data.max_answer_length = 30  # qa
  data.n_best_size = 20  # qa
  data.version_2 = False  # qa: SQuAD v2.0 (unanswerable questions)
  data.null_score_diff_threshold = 0.0  # qa v2.0
  data.max_seq_length = 128
  # Comma-separated lengths, e.g. '32,64': each batch is cut to the shortest of them (or
  # max_seq_length; lengths not below it are ignored) that holds its longest row, so short texts
  # do not pay for padding; one compiled step per length used. '' = always max_seq_length.
  # 'auto': up to max_buckets lengths, multiples of bucket_multiple, chosen from the training
  # set's batches to compute the fewest tokens (`jaxfm.data.length_groups`), recorded in
  # config.json; evaluate and predict cut their batches to the same lengths.
  data.length_buckets = "auto"
  data.max_buckets = 4
  data.bucket_multiple = 8
  # With 'auto': one more length's compile costs the time of this many training tokens; 'auto'
  # takes the platform's estimate (`length_groups.COMPILE_COST_TOKENS`), '0' counts compiles free.
  data.compile_cost_tokens = "auto"
  # Each training batch holds rows of similar length: far less padding, but batches whose
  # labels correlate with length where the data has such a correlation.
  data.group_by_length = False
  # Several short examples per row of max_seq_length tokens (classification, regression, ner):
  # each token attends only within its own example and positions restart per example
  # (`jaxfm.data.packing`); train.batch_size counts rows.
  data.packing = False
  data.max_examples_per_row = 32  # with packing: examples (and [CLS] outputs) per row at most
  data.padding_share = 0.0  # resolved: tokens computed per real token over epoch 0's batches
  data.tokenizer = ""  # '' = the init_from checkpoint's tokenizer
  data.lowercase = True  # for a bare vocab.txt
  data.max_train_examples = 0  # 0 = all; else the first N (quick runs)
  data.max_eval_examples = 0
  data.on_error = "raise"  # raise | skip (counted and logged)
  data.seed = 0
  return data


def fail(field: str, value, why: str) -> None:
  """Raises the `ConfigError` `field=value why`."""
  raise ConfigError(f"{field}={value!r} {why}")


def positive(cfg: ml_collections.ConfigDict, *fields: str) -> None:
  """Each dotted field must be > 0."""
  for field in fields:
    value = _get(cfg, field)
    if not value > 0:
      fail(field, value, "must be > 0")


def _get(cfg: ml_collections.ConfigDict, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def one_of(cfg: ml_collections.ConfigDict, field: str, choices) -> None:
  """The dotted field must be one of `choices`."""
  value = _get(cfg, field)
  if value not in choices:
    fail(field, value, f"must be one of {', '.join(map(str, choices))}")


def validate_model(cfg: ml_collections.ConfigDict) -> None:
  """Checks the `model` section (shared by pretraining and fine-tuning)."""
  m = cfg.model
  positive(cfg, "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
            "model.intermediate_size", "model.max_position_embeddings", "model.type_vocab_size",
            "model.layer_norm_eps", "model.initializer_range")
  if m.hidden_size % m.num_heads:
    raise ConfigError(f"model.num_heads={m.num_heads} does not divide "
                      f"model.hidden_size={m.hidden_size}")
  if m.embedding_size < 0:
    fail("model.embedding_size", m.embedding_size, "must be >= 0 (0 = hidden_size)")
  if m.loss_vocab_chunk < 0:
    fail("model.loss_vocab_chunk", m.loss_vocab_chunk, "must be >= 0 (0 = whole vocabulary)")
  for field in ("model.hidden_dropout", "model.attention_dropout"):
    if not 0.0 <= _get(cfg, field) < 1.0:
      fail(field, _get(cfg, field), "must be in [0, 1)")
  one_of(cfg, "model.hidden_act", ACTIVATIONS)
  one_of(cfg, "model.dtype", COMPUTE_DTYPES)
  one_of(cfg, "model.remat_policy", REMAT_POLICIES)
  one_of(cfg, "model.cpu_paths", ("auto", "on", "off"))
  validate_peft_positions(cfg)
  validate_peft_architecture(cfg)


def validate_mesh(cfg: ml_collections.ConfigDict) -> None:
  """The mesh sizes and the expected platform alone; `jaxfm.runtime.preflight` checks them
  against the devices."""
  one_of(cfg, "runtime.platform", PLATFORMS)
  sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
  for name, size in zip(("data", "fsdp", "tensor"), sizes):
    if size == 0 or size < -1:
      fail(f"mesh.{name}", size, "must be a positive size or -1 (fill from the device count)")
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh={sizes}: at most one of mesh.data/fsdp/tensor may be -1")
  if cfg.mesh.tensor > 1 and cfg.model.num_heads % cfg.mesh.tensor:
    raise ConfigError(f"mesh.tensor={cfg.mesh.tensor} does not divide "
                      f"model.num_heads={cfg.model.num_heads}")
  if cfg.mesh.tensor > 1 and cfg.model.get("pruned_heads"):
    heads = [cfg.model.num_heads - len(pruned) for pruned in cfg.model.pruned_heads]
    if any(n % cfg.mesh.tensor for n in heads):
      raise ConfigError(f"mesh.tensor={cfg.mesh.tensor} does not divide every layer's heads "
                        f"{heads} (model.pruned_heads)")


def validate_optim(cfg: ml_collections.ConfigDict) -> None:
  one_of(cfg, "optim.name", ("adamw", "lamb"))
  one_of(cfg, "optim.decay", ("linear", "cosine", "constant"))
  positive(cfg, "optim.peak_learning_rate", "optim.eps")
  for field in ("optim.b1", "optim.b2"):
    if not 0.0 <= _get(cfg, field) < 1.0:
      fail(field, _get(cfg, field), "must be in [0, 1)")
  for field in ("optim.weight_decay", "optim.clip_norm", "optim.warmup_steps",
                "optim.end_learning_rate_factor"):
    if _get(cfg, field) < 0:
      fail(field, _get(cfg, field), "must be >= 0")


def validate_train(cfg: ml_collections.ConfigDict) -> None:
  t = cfg.train
  positive(cfg, "train.steps", "train.batch_size", "train.grad_accum_steps", "train.log_every",
            "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
            "train.max_consecutive_nonfinite")
  if t.eval_batches < 0:
    fail("train.eval_batches", t.eval_batches, "must be >= 0")
  if t.checkpoint_every_seconds < 0:
    fail("train.checkpoint_every_seconds", t.checkpoint_every_seconds, "must be >= 0")
  profile_window(t)
  if t.keep_every < 0 or t.keep_every % t.checkpoint_every:
    fail("train.keep_every", t.keep_every,
          f"must be 0 or a multiple of train.checkpoint_every={t.checkpoint_every}")
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f"train.grad_accum_steps={t.grad_accum_steps} does not divide "
                      f"train.batch_size={t.batch_size}")
  if cfg.optim.warmup_steps > t.steps:
    raise ConfigError(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds "
                      f"train.steps={t.steps}")
  validate_peft_schedule(cfg)


def validate_sequence_length(cfg: ml_collections.ConfigDict) -> None:
  """`data.max_seq_length` leaves room for special tokens and some text (both kinds of run)."""
  if cfg.data.max_seq_length < 8:
    fail("data.max_seq_length", cfg.data.max_seq_length, "must be >= 8")


def validate_pretrain_data(cfg: ml_collections.ConfigDict) -> None:
  d = cfg.data
  one_of(cfg, "data.format", ("text", "jsonl", "tfds"))
  one_of(cfg, "data.documents", ("blank_line", "line"))
  one_of(cfg, "data.on_decode_error", ("error", "skip", "replace"))
  positive(cfg, "data.max_seq_length", "data.max_predictions_per_seq", "data.vocab_size")
  if d.format == "tfds" and not d.tfds_name:
    raise ConfigError("data.format='tfds' needs data.tfds_name (e.g. 'wikipedia/20230601.en')")
  if d.max_seq_length > cfg.model.max_position_embeddings:
    raise ConfigError(f"data.max_seq_length={d.max_seq_length} exceeds "
                      f"model.max_position_embeddings={cfg.model.max_position_embeddings}")
  validate_sequence_length(cfg)
  if not 0.0 < d.mask_prob < 1.0:
    fail("data.mask_prob", d.mask_prob, "must be in (0, 1)")
  one_of(cfg, "data.word_segmenter", ("", "jieba"))
  if d.word_segmenter and not d.whole_word_masking:
    raise ConfigError(f"data.word_segmenter={d.word_segmenter!r} marks words for whole-word "
                      "masking: set data.whole_word_masking=True")
  if d.word_segmenter_dict and not d.word_segmenter:
    raise ConfigError("data.word_segmenter_dict needs data.word_segmenter='jieba'")
  if d.max_predictions_per_seq > d.max_seq_length:
    raise ConfigError(f"data.max_predictions_per_seq={d.max_predictions_per_seq} exceeds "
                      f"data.max_seq_length={d.max_seq_length}")
  if not 0.0 <= d.eval_fraction < 1.0:
    fail("data.eval_fraction", d.eval_fraction, "must be in [0, 1)")
  if d.worker_count < 0:
    fail("data.worker_count", d.worker_count, "must be >= 0")
  if d.num_shards < 1 or cfg.train.batch_size % d.num_shards:
    fail("data.num_shards", d.num_shards,
          f"must be >= 1 and divide train.batch_size={cfg.train.batch_size}")
  validate_sources(cfg)
  if not d.tokenizer and d.vocab_size < 128:
    fail("data.vocab_size", d.vocab_size, "must be >= 128 to train a tokenizer")
  if d.tokenizer and cfg.model.vocab_size < 1:
    fail("model.vocab_size", cfg.model.vocab_size, "must be >= 1")


def validate_sources(cfg: ml_collections.ConfigDict) -> None:
  """`data.sources`: (name, files, weight) triples with distinct names and weights > 0."""
  d = cfg.data
  if not d.sources:
    return
  if d.train_files or d.format == "tfds":
    raise ConfigError("data.sources replaces data.train_files and reads text or jsonl files: "
                      "leave data.train_files empty and data.format text or jsonl")
  names = []
  for source in d.sources:
    if not (isinstance(source, (tuple, list)) and len(source) == 3):
      fail("data.sources", source, "must be (name, files, weight) triples")
    name, files, weight = source
    if not (isinstance(name, str) and re.fullmatch(r"[\w.-]+", name)) or name in names:
      fail("data.sources", source,
           "needs a distinct name of letters, digits, dashes, dots or underscores")
    if not (isinstance(files, str) and files.strip()):
      fail("data.sources", source, "needs its files (comma-separated globs)")
    if not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
      fail("data.sources", source, "needs a weight > 0")
    names.append(name)


def validate_finetune(cfg: ml_collections.ConfigDict) -> None:
  """Checks the fine-tuning fields every task kind shares, before the data is read;
  `jaxfm.tasks.validate_finetune` adds the task kind and the fields it reads."""
  d, t = cfg.data, cfg.train
  one_of(cfg, "data.on_error", ("raise", "skip"))
  one_of(cfg, "train.best_mode", ("max", "min"))
  if not (d.train_file or d.tfds_name):
    raise ConfigError("data.train_file is required (or data.tfds_name for a tfds dataset)")
  validate_sequence_length(cfg)
  if d.length_buckets != "auto":
    length_buckets(d)
  positive(cfg, "data.max_buckets", "data.bucket_multiple")
  if d.compile_cost_tokens != "auto" and not str(d.compile_cost_tokens).isdigit():
    fail("data.compile_cost_tokens", d.compile_cost_tokens,
         "must be 'auto' or a whole number of tokens")
  for field in ("data.max_train_examples", "data.max_eval_examples", "train.epochs",
                "train.eval_every", "train.checkpoint_every", "train.early_stopping_patience",
                "optim.warmup_ratio"):
    if _get(cfg, field) < 0:
      fail(field, _get(cfg, field), "must be >= 0")
  if not 0.0 < cfg.optim.layer_decay <= 1.0:
    fail("optim.layer_decay", cfg.optim.layer_decay, "must be in (0, 1]")
  if cfg.optim.warmup_ratio >= 1.0:
    fail("optim.warmup_ratio", cfg.optim.warmup_ratio, "must be < 1")
  if t.early_stopping_patience and not (d.dev_file or d.tfds_name):
    raise ConfigError("train.early_stopping_patience needs a dev set (data.dev_file)")
  validate_peft(cfg)
  validate_quantize(cfg)


def validate_quantize(cfg: ml_collections.ConfigDict) -> None:
  """Checks the `quantize` section (fine-tuning)."""
  qat = cfg.quantize.qat
  if not qat:
    return
  if qat not in INT8_MODES:
    fail("quantize.qat", qat, f"must be '' (off) or one of {', '.join(INT8_MODES)}")
  if cfg.peft.method:
    fail("quantize.qat", qat, f"trains the whole model for its int8 export: not with "
         f"peft.method={cfg.peft.method!r} (int8 export takes fully fine-tuned runs)")


def validate_peft(cfg: ml_collections.ConfigDict) -> None:
  """Checks the `peft` section (fine-tuning)."""
  p = cfg.peft
  if not p.method:
    if p.get("init_adapter"):
      raise ConfigError(f"peft.init_adapter={p.init_adapter!r} needs peft.method: the method "
                        "of its adapter")
    return
  one_of(cfg, "peft.method", tuple(peft.METHODS))
  if p.get("init_adapter") and p.method == "adalora":
    fail("peft.init_adapter", p.init_adapter, "cannot continue AdaLoRA: its rank allocation "
         "(importance EMAs, budget schedule) would start over on pruned triplets")
  if not cfg.init_from:
    raise ConfigError(f"peft.method={p.method!r} needs init_from: the base it adapts")
  positive(cfg, "peft.rank", "peft.alpha")
  if not 0.0 <= p.dropout < 1.0:
    fail("peft.dropout", p.dropout, "must be in [0, 1)")
  if p.dropout and p.method != "lora":
    fail("peft.dropout", p.dropout, f"is LoRA's (dropout on its input): "
         f"peft.method={p.method!r} has none, set it to 0")
  try:
    peft.parse_targets(p.target_modules, ())
  except ValueError as e:
    fail("peft.target_modules", p.target_modules, str(e))
  try:
    saved = peft.parse_saved(p.get("modules_to_save", ""))
  except ValueError as e:
    fail("peft.modules_to_save", p.modules_to_save, str(e))
  if peft.SAVABLE["pooler"] in saved and cfg.task not in ("classification", "regression"):
    fail("peft.modules_to_save", p.modules_to_save, f"the {cfg.task} head reads no pooler")
  if p.method in ("prompt", "prefix"):
    positive(cfg, "peft.num_virtual_tokens")
  if p.method in ("houlsby", "pfeiffer"):
    positive(cfg, "peft.reduction_factor")
  if p.method == "adalora":
    validate_adalora(cfg)
  if p.method == "prompt" and cfg.data.get("packing"):
    fail("data.packing", True, "cannot put a soft prompt (prompt tuning) before packed "
         "rows: one row holds several examples")
  validate_peft_positions(cfg)
  validate_peft_architecture(cfg)


def validate_adalora(cfg: ml_collections.ConfigDict) -> None:
  """AdaLoRA's ranks, EMAs and regulariser (its schedule: `validate_peft_schedule`)."""
  p = cfg.peft
  positive(cfg, "peft.init_r", "peft.target_r", "peft.deltaT")
  if p.target_r > p.init_r:
    fail("peft.target_r", p.target_r, f"exceeds peft.init_r={p.init_r}: AdaLoRA prunes ranks, "
         "it does not add them")
  for field in ("peft.beta1", "peft.beta2"):
    if not 0.0 < _get(cfg, field) < 1.0:
      fail(field, _get(cfg, field), "must be in (0, 1)")
  for field in ("peft.tinit", "peft.tfinal", "peft.orth_reg_weight"):
    if _get(cfg, field) < 0:
      fail(field, _get(cfg, field), "must be >= 0")


def validate_peft_schedule(cfg: ml_collections.ConfigDict) -> None:
  """AdaLoRA's budgeting phase lies inside the run (peft's rule: tinit < total_step - tfinal,
  total_step = train.steps); checked once train.steps is final."""
  p = cfg.get("peft")
  if not (p and p.method == "adalora"):
    return
  if p.tinit + p.tfinal >= cfg.train.steps:
    fail("peft.tfinal", p.tfinal, f"with peft.tinit={p.tinit} leaves no budgeting phase in "
         f"train.steps={cfg.train.steps}: tinit + tfinal must be < train.steps")


def validate_peft_positions(cfg: ml_collections.ConfigDict) -> None:
  """Prompt and prefix tuning's virtual tokens take the first positions (as transformers' BERT
  under peft), so they and the longest row must fit the model's position table; checked for
  the config's model and again for the architecture `init_from` brings."""
  p = cfg.get("peft")
  if not (p and p.method in ("prompt", "prefix")):
    return
  if cfg.data.max_seq_length + p.num_virtual_tokens > cfg.model.max_position_embeddings:
    fail("peft.num_virtual_tokens", p.num_virtual_tokens,
         f"plus data.max_seq_length={cfg.data.max_seq_length} exceeds the model's "
         f"max_position_embeddings={cfg.model.max_position_embeddings}")


def validate_peft_architecture(cfg: ml_collections.ConfigDict) -> None:
  """Prefix tuning's prefix holds keys and values for every head of every layer (as peft's
  does), so it cannot adapt a head-pruned model (`jaxfm.prune`); checked for the config's
  model and again for the architecture `init_from` brings."""
  p = cfg.get("peft")
  pruned = cfg.model.get("pruned_heads", ())
  if p and p.method == "prefix" and any(pruned):
    fail("peft.method", p.method, f"cannot adapt a head-pruned model (model.pruned_heads="
         f"{[list(heads) for heads in pruned]}, from init_from): its prefix holds keys and "
         f"values for every head of every layer. Use another method "
         f"({', '.join(m for m in peft.METHODS if m != 'prefix')}), or prefix-tune the "
         "unpruned model")


# ---------------------------------------------------------------- distillation

# soft targets, hard labels, hidden-state MSE, MiniLM's attention and value-relation KL,
# MiniLMv2's query and key relations; task=mlm: DistilBERT's cosine of the last hidden states
DISTILL_LOSSES = ("kl", "task", "hidden", "attention", "value_relation", "query_relation",
                  "key_relation", "cosine")
_TASK_LOSSES = {"mlm": ("kl", "task", "cosine")}  # else every loss but cosine
_STATE_LOSSES = ("hidden", "attention", "value_relation", "query_relation", "key_relation",
                 "cosine")  # read inside the encoders
STUDENT_INITS = ("random", "every_k", "init_from")
TEACHER_DTYPES = ("float32", "bfloat16")


def distill_defaults() -> ml_collections.ConfigDict:
  """Every distillation field: fine-tuning's, plus `teacher` and the `distill` section.

  The `model` section is the student's. With `distill.student_init=every_k` its architecture is
  the teacher's but for `model.num_layers`; with `random` its size fields are the config's and
  the vocabulary, positions and token types the teacher's; with `init_from` the checkpoint's.
  """
  cfg = finetune_defaults()
  cfg.teacher = ""  # a jaxfm fine-tuning workdir (its best, else latest, params)
  cfg.distill = _distill_section()
  return cfg


def distill_mlm_defaults() -> ml_collections.ConfigDict:
  """Task-agnostic distillation on the pretraining corpus (DistilBERT): pretraining's fields,
  `task='mlm'`, `teacher` (an MLM checkpoint) and the `distill` section. `data.tokenizer` ''
  takes the teacher's."""
  cfg = pretrain_defaults()
  cfg.task = "mlm"
  cfg.teacher = ""  # 'hf:DIR', a jaxfm model dir or a pretraining workdir
  cfg.distill = _distill_section()
  cfg.distill.losses = "kl=5.0,task=2.0,cosine=1.0"  # DistilBERT's weights
  return cfg


def _distill_section() -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.student_init = "every_k"  # random | every_k (DistilBERT) | init_from
  # name=weight, comma-separated: kl (soft targets at `temperature`, scaled by T^2; for
  # regression the squared error to the teacher's output), task (the hard-label loss), hidden
  # (TinyBERT hidden-state MSE over `layer_map`, through a learned projection when widths differ),
  # attention and value_relation (MiniLM: per-head KL of the self-attention distributions and
  # of softmax(V V^T / sqrt(d)) over `attention_map`; the student keeps the teacher's heads),
  # query_relation and key_relation (MiniLMv2: softmax(Q Q^T / sqrt(d)), K K^T likewise);
  # task=mlm: kl and task at the masked positions, cosine (1 - cos of the last hidden states).
  d.losses = "kl=1.0,task=0.0"
  d.temperature = 2.0
  # 'S:T,...' student:teacher hidden states, 0 = the embeddings, i = layer i's output;
  # '' = uniform: 0:0 and i:i*k for k = teacher layers / student layers.
  d.layer_map = ""
  # 'S:T,...' student:teacher layers (1-based) for the attention and relation losses; '' = the
  # last of each.
  d.attention_map = ""
  # 0: the relations per attention head (the student's head count must be the teacher's);
  # R > 0: MiniLMv2's relation heads, each model's heads concatenated and split into R.
  d.relation_heads = 0
  # A directory: the teacher's top-k logits on the training set, written once (resumable) and
  # read instead of running the teacher in the step; '' = the teacher runs in the step.
  d.teacher_cache = ""
  d.teacher_top_k = 16  # logits kept per target (all of them when the head has no more)
  d.teacher_dtype = "float32"  # float32 | bfloat16: the teacher's params and compute
  d.teacher_sha256 = ""  # resolved: the teacher's params; a changed teacher is refused
  return d


def distill_losses(d: ml_collections.ConfigDict) -> dict[str, float]:
  """`distill.losses` as {name: weight}; ConfigError naming the field if malformed."""
  weights = {}
  for entry in filter(None, (e.strip() for e in d.losses.split(","))):
    name, _, weight = entry.partition("=")
    if name.strip() not in DISTILL_LOSSES:
      fail("distill.losses", d.losses,
           f"names an unknown loss {name.strip()!r}; choose from {', '.join(DISTILL_LOSSES)}")
    try:
      weights[name.strip()] = float(weight)
    except ValueError:
      fail("distill.losses", d.losses, f"gives {name.strip()!r} no number: use name=weight")
  if not any(w > 0 for w in weights.values()) or any(w < 0 for w in weights.values()):
    fail("distill.losses", d.losses, "needs weights >= 0, one of them > 0")
  return weights


def layer_map(d: ml_collections.ConfigDict, student_layers: int,
              teacher_layers: int) -> tuple[tuple[int, int], ...]:
  """`distill.layer_map` as (student, teacher) hidden-state indices (0 = embeddings)."""
  if not d.layer_map.strip():
    if teacher_layers % student_layers:
      fail("distill.layer_map", d.layer_map, f"must be given: {teacher_layers} teacher layers "
           f"are not a multiple of {student_layers} student layers")
    k = teacher_layers // student_layers
    return tuple((i, i * k) for i in range(student_layers + 1))
  pairs = []
  for entry in d.layer_map.split(","):
    s, _, t = entry.strip().partition(":")
    if not (s.isdigit() and t.isdigit() and int(s) <= student_layers
            and int(t) <= teacher_layers):
      fail("distill.layer_map", d.layer_map, f"must list S:T pairs with 0 <= S <= "
           f"{student_layers} (student layers) and 0 <= T <= {teacher_layers} (teacher layers)")
    pairs.append((int(s), int(t)))
  return tuple(pairs)


def validate_distill(cfg: ml_collections.ConfigDict) -> None:
  """Checks the distillation fields before the teacher or the data is read."""
  d = cfg.distill
  if not cfg.teacher:
    raise ConfigError("teacher is required: a jaxfm fine-tuning workdir")
  one_of(cfg, "distill.student_init", STUDENT_INITS)
  if (d.student_init == "init_from") != bool(cfg.init_from):
    fail("distill.student_init", d.student_init,
         "must be 'init_from' exactly when init_from is set")
  losses = distill_losses(d)
  allowed = _TASK_LOSSES.get(cfg.task, tuple(n for n in DISTILL_LOSSES if n != "cosine"))
  if other := [name for name in losses if name not in allowed]:
    fail("distill.losses", d.losses, f"names {other[0]!r}, which task={cfg.task!r} does not "
         f"take; choose from {', '.join(allowed)}")
  positive(cfg, "distill.temperature")
  one_of(cfg, "distill.teacher_dtype", TEACHER_DTYPES)
  positive(cfg, "distill.teacher_top_k")
  if d.relation_heads < 0:
    fail("distill.relation_heads", d.relation_heads, "must be >= 0")
  if d.relation_heads and "attention" in losses:
    fail("distill.relation_heads", d.relation_heads, "splits queries, keys and values into "
         "MiniLMv2's relation heads, which compare no attention distributions: use "
         "query_relation and key_relation instead of attention")
  inside = [name for name in _STATE_LOSSES if name in losses]
  if inside:  # read at each layer's call (`distillation.capture`)
    if cfg.model.scan_layers:
      fail("model.scan_layers", cfg.model.scan_layers, f"must be False for the {inside[0]} loss")
    if cfg.model.remat_policy != "none":
      fail("model.remat_policy", cfg.model.remat_policy,
           f"must be 'none' for the {inside[0]} loss")
    if d.teacher_cache:
      fail("distill.teacher_cache", d.teacher_cache, f"holds logits only: the {inside[0]} loss "
           "needs the teacher in the step")
  if cfg.task == "mlm":
    if d.teacher_cache:
      fail("distill.teacher_cache", d.teacher_cache, "is not for task='mlm': its masks are "
           "drawn anew each epoch")
    return
  if cfg.data.packing:
    fail("data.packing", cfg.data.packing, "is not supported by distillation yet")
  if cfg.peft.method:
    fail("peft.method", cfg.peft.method, "is not supported by distillation: the student trains "
         "whole")
  if cfg.quantize.qat:
    fail("quantize.qat", cfg.quantize.qat, "is not supported by distillation: distil in float, "
         "then fine-tune or quantize the student")
  if not (cfg.data.dev_file or cfg.data.tfds_name):
    raise ConfigError("data.dev_file is required: a distilled student's params are kept in "
                      "WORKDIR/best, which evaluate, predict and convert read")


# ---------------------------------------------------------------- structured pruning

PRUNE_IMPORTANCE = ("gradient", "magnitude")
PRUNE_RECOVERIES = ("finetune", "distill")


def prune_defaults() -> ml_collections.ConfigDict:
  """Every structured-pruning field: fine-tuning's (the task, the data whose training batches
  rank the heads and neurons and whose dev split scores the result, the eval batch size),
  `init_from` (the fine-tuned workdir to prune), the `prune` section and, for a recovery by
  distillation, the `distill` section (its teacher is `init_from`, its student the pruned
  model: `student_init` is set to init_from). The architecture is the workdir's, made smaller;
  `model` keeps its compute fields (dtype, scan, remat). A recovery trains as fine-tuning (or
  distillation) does with the `optim` and `train` fields, for `prune.recovery_epochs` epochs."""
  cfg = finetune_defaults()
  cfg.train.epochs = 0.0  # pruning trains nothing; a recovery's length is prune.recovery_epochs
  p = ml_collections.ConfigDict()
  p.heads_share = 0.0  # of all attention heads, removed (never a layer's last head)
  p.ffn_share = 0.0  # of each layer's FFN neurons, removed (the same count per layer)
  p.importance = "gradient"  # gradient (Michel et al. 2019: |dL/d gate|) | magnitude
  p.batches = 8  # training batches of train.batch_size the gradient importance sums over
  # Epochs of training from the pruned model in the same command (0: none, the workdir holds
  # the pruned model; else the recovered one, the pruned one in WORKDIR/pruned).
  p.recovery_epochs = 0.0
  p.recovery = "finetune"  # finetune | distill (the unpruned init_from as the teacher)
  cfg.prune = p
  cfg.distill = _distill_section()
  return cfg


def validate_prune(cfg: ml_collections.ConfigDict) -> None:
  """Checks the pruning fields before the source workdir or the data is read."""
  p = cfg.prune
  if not cfg.init_from:
    raise ConfigError("init_from is required: the jaxfm fine-tuning workdir to prune")
  for field in ("prune.heads_share", "prune.ffn_share"):
    if not 0.0 <= _get(cfg, field) < 1.0:
      fail(field, _get(cfg, field), "must be in [0, 1) (the share of units removed)")
  one_of(cfg, "prune.importance", PRUNE_IMPORTANCE)
  positive(cfg, "prune.batches")
  if p.recovery_epochs < 0:
    fail("prune.recovery_epochs", p.recovery_epochs, "must be >= 0 (0: no recovery)")
  one_of(cfg, "prune.recovery", PRUNE_RECOVERIES)
  if cfg.train.epochs != 0:
    raise ConfigError(f"train.epochs={cfg.train.epochs!r} is not read by pruning: a recovery's "
                      "length is prune.recovery_epochs")
  if cfg.peft.method:
    fail("peft.method", cfg.peft.method, "is not supported by pruning: prune a fully "
         "fine-tuned (or merged) workdir")
  if cfg.quantize.qat and not p.recovery_epochs:
    raise ConfigError(f"quantize.qat={cfg.quantize.qat!r} is not for pruning, which trains "
                      "nothing: it is the recovery's (prune.recovery_epochs > 0)")
  if p.recovery_epochs and not (cfg.data.train_file or cfg.data.tfds_name):
    raise ConfigError("data.train_file is required: the recovery trains on it "
                      "(prune.recovery_epochs > 0)")
  if not (cfg.data.dev_file or cfg.data.tfds_name):
    raise ConfigError("data.dev_file is required: the pruned model is scored on it and kept in "
                      "WORKDIR/best, which evaluate, predict and convert read")
  if p.importance == "gradient" and not (cfg.data.train_file or cfg.data.tfds_name):
    raise ConfigError("data.train_file is required: its batches rank the heads and neurons "
                      "(prune.importance=gradient)")


def profile_window(train: ml_collections.ConfigDict) -> tuple[int, int] | None:
  """`train.profile_steps` as (START, STOP): trace the steps after START up to STOP; None when
  '' (or in a config saved before the field existed).

  Raises:
    ConfigError: naming the field, unless it is '' or 'START,STOP' with 0 <= START < STOP.
  """
  text = train.get("profile_steps", "")
  if not text.strip():
    return None
  parts = [p.strip() for p in text.split(",")]
  if len(parts) != 2 or not all(p.isdigit() for p in parts) or int(parts[0]) >= int(parts[1]):
    fail("train.profile_steps", text, "must be '' or 'START,STOP' with 0 <= START < STOP")
  return int(parts[0]), int(parts[1])


def length_buckets(data: ml_collections.ConfigDict) -> tuple[int, ...]:
  """`data.length_buckets` as ascending lengths ending with `data.max_seq_length`; entries
  not below it are dropped (a config's buckets still apply with a shorter max_seq_length),
  and a config saved before the field existed has none.

  Raises:
    ConfigError: naming the field, if an entry is not a positive integer.
  """
  entries = [e.strip() for e in data.get("length_buckets", "").split(",") if e.strip()]
  if not all(e.isdigit() and int(e) > 0 for e in entries):
    fail("data.length_buckets", data.length_buckets, "must list positive integers")
  below = {int(e) for e in entries if int(e) < data.max_seq_length}
  return tuple(sorted(below)) + (data.max_seq_length,)


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks a pretraining config: raises `ConfigError` naming the dotted field and bad value;
  does no device work."""
  validate_model(cfg)
  validate_mesh(cfg)
  validate_optim(cfg)
  validate_train(cfg)
  validate_pretrain_data(cfg)
