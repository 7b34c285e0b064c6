"""The BERT encoder as pure Flax linen modules.

Parameters carry logical axis names only (see `jaxfm.sharding` for the rules
that map them onto a mesh); activations are constrained with logical names
too, which is a no-op outside a mesh context. Parameters are float32; the
compute dtype comes from the config; LayerNorm statistics, softmax and logits
used by losses are float32.

With `config.cpu_paths` the matmuls, dropout and the remat'd backward order take
`jaxfm.cpu`'s XLA:CPU forms (the same values); otherwise this is plain Flax.

Parameter-efficient methods that act on activations (`jaxfm.peft`: prompt and prefix tuning,
bottleneck adapters, LoRA's low-rank path beside the projections) reach the model as one
optional subtree of its params, `encoder/peft` (`PEFT_*` below), which `jaxfm.peft.Plan.combine`
puts there and `BertEncoder` hands to the embeddings and to each layer as inputs. `init` never
creates it, and without it the model is the plain encoder, compiled to the same program.
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfm.cpu import dropout as cpu_dropout
from jaxfm.cpu import layers as cpu_layers
from jaxfm.models.config import BertConfig

Array = jax.Array

# Logical axis names used by parameters.
VOCAB, EMBED, EMBED_OUT, HEADS, KV, MLP, LAYERS, CLASSES = (
    "vocab", "embed", "embed_out", "heads", "kv", "mlp", "layers", "classes")
# Logical axis names used by activations.
ACT_BATCH, ACT_LENGTH, ACT_EMBED, ACT_HEADS, ACT_MLP = (
    "act_batch", "act_length", "act_embed", "act_heads", "act_mlp")

# The PEFT hooks under `encoder/peft`: soft-prompt input embeddings [virtual, embed]; per-layer
# key/value prefixes [layers, virtual, 2, heads, head_dim]; bottleneck adapters after the
# attention output and after the FFN output, each {down_kernel [layers, hidden, bottleneck],
# down_bias [layers, bottleneck], up_kernel [layers, bottleneck, hidden], up_bias [layers, hidden]}.
# LoRA: {projection: {lora_a [layers, *in, r], lora_b [layers, r, *out] (scale included)}, and
# LORA_DROPOUT [layers] float (the rate on the LoRA path's input; absent = none)}, projections
# named as `jaxfm.peft.sites.TARGETS` names them.
PEFT = "peft"
PEFT_PROMPT, PEFT_PREFIX, PEFT_ATTENTION_ADAPTER, PEFT_OUTPUT_ADAPTER, PEFT_LORA = (
    "prompt", "prefix", "attention_adapter", "output_adapter", "lora")
PEFT_PER_LAYER = (PEFT_PREFIX, PEFT_ATTENTION_ADAPTER, PEFT_OUTPUT_ADAPTER, PEFT_LORA)
LORA_DROPOUT = "dropout"
QKV = ("query", "key", "value")  # the fused q/k/v axis's slots
Hooks = dict  # {PEFT_* name: array or adapter dict}; per layer inside `TransformerLayer`


def activation(name: str) -> Callable[[Array], Array]:
  """HF naming: 'gelu' is the exact erf form BERT uses, 'gelu_new' the tanh one.

  Checkpointed: autodiff keeps only the input and recomputes the function's internals in the
  backward pass; left to itself it keeps two more [tokens, intermediate] arrays per layer for
  the erf form.
  """
  return jax.checkpoint({
      "gelu": functools.partial(nn.gelu, approximate=False),
      "gelu_new": functools.partial(nn.gelu, approximate=True),
      "gelu_tanh": functools.partial(nn.gelu, approximate=True),
      "relu": nn.relu,
  }[name])


def _normal(config: BertConfig, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def contract(config: BertConfig, x: Array, kernel: Array, axes: int = 1) -> Array:
  """x [*tokens, *features] · kernel [*features, *out] -> [*tokens, *out] (x's last `axes`
  axes with kernel's first), as `jnp.tensordot` or, with `config.cpu_paths`, one 2-D GEMM."""
  if config.cpu_paths:
    return cpu_layers.matmul_over_tokens(x, kernel, axes)
  return jnp.tensordot(x, kernel, axes)


def dropout(config: BertConfig, rate: float) -> nn.Module:
  """`nn.Dropout(rate)`, or with `config.cpu_paths` its cheaper-to-draw CPU form."""
  return cpu_dropout.Dropout(rate) if config.cpu_paths else nn.Dropout(rate)


def at_positions(x: Array, positions: Array | None) -> Array:
  """x [batch, length, ...] at `positions` [batch, p] int -> [batch, p, ...] (x when None)."""
  if positions is None:
    return x
  return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


def attention_mask_4d(attention_mask: Array, segment_ids: Array | None = None,
                      query_positions: Array | None = None) -> Array:
  """Which keys each query attends to, bool, True = attend.

  Without `segment_ids`: every real key ([batch, 1, 1, length] from the 1/0 `attention_mask`
  [batch, length]). With `segment_ids` [batch, length] (packed rows: 1, 2, ... per example):
  [batch, 1, queries, length], a real token attending to the real tokens of its own example
  only, and a padding token to its own segment (so that no query's row is empty). Queries are
  every position, or those at `query_positions` [batch, queries].
  """
  real = attention_mask.astype(bool)  # [batch, length]
  if segment_ids is None:
    return real[:, None, None, :]
  query_segments = at_positions(segment_ids, query_positions)  # [batch, queries]
  query_real = at_positions(real, query_positions)  # [batch, queries]
  same = query_segments[:, :, None] == segment_ids[:, None, :]  # [batch, queries, length]
  return (same & (real[:, None, :] | ~query_real[:, :, None]))[:, None]


def bottleneck(config: BertConfig, x: Array, adapter: Hooks) -> Array:
  """Residual bottleneck adapter (Houlsby et al., 2019): x + up(act(down(x))), one layer's
  `PEFT_*_ADAPTER` params. x: [batch, length, hidden] -> the same shape."""
  down = contract(config, x, adapter["down_kernel"].astype(config.dtype))  # [b, l, bottleneck]
  h = activation(config.hidden_act)(down + adapter["down_bias"].astype(config.dtype))
  up = contract(config, h, adapter["up_kernel"].astype(config.dtype))  # [b, l, hidden]
  return x + up + adapter["up_bias"].astype(config.dtype)


def with_lora(module: nn.Module, y: Array, x: Array, lora: Hooks, name: str,
              deterministic: bool, axes: int = 1) -> Array:
  """y + scale · dropout(x)·A·B where one layer's `PEFT_LORA` adapts projection `name`
  (y = x·W + b), as huggingface/peft's LoRA layer computes it; else y. x: [*tokens, *in]
  (`axes` input axes), y: [*tokens, *out]. The dropout draws from `module`'s "dropout" stream;
  the rate is a hook input (an array), so it is applied with a traced keep probability."""
  if name not in lora:
    return y
  cfg = module.config
  rate = lora.get(LORA_DROPOUT)
  if rate is not None and not deterministic:
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    x = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))
  h = contract(cfg, x, lora[name]["lora_a"].astype(cfg.dtype), axes)  # [*tokens, r]
  return y + contract(cfg, h, lora[name]["lora_b"].astype(cfg.dtype))  # [*tokens, *out]


def with_prefix(k: Array, v: Array, mask: Array, prefix: Array) -> tuple[Array, Array, Array]:
  """Prepends key/value prefixes (prefix tuning) that every query attends to.

  k, v: [batch, length, heads, head_dim]; mask: [batch, 1, 1 or queries, length] bool;
  prefix: [virtual, 2, heads, head_dim] (keys at 0, values at 1), or with a leading batch axis.
  -> k, v [batch, virtual + length, heads, head_dim] and mask [..., virtual + length].
  """
  prefix = jnp.broadcast_to(prefix, (k.shape[0], *prefix.shape[-4:])).astype(k.dtype)
  virtual = prefix.shape[1]
  k = jnp.concatenate([prefix[:, :, 0], k], axis=1)
  v = jnp.concatenate([prefix[:, :, 1], v], axis=1)
  mask = jnp.concatenate([jnp.ones((*mask.shape[:-1], virtual), bool), mask], axis=-1)
  return k, v, mask


def dense(config: BertConfig, features: int, names: tuple[str, str], name: str) -> nn.Dense:
  """A float32-parameter Dense layer computing in the config's dtype."""
  return nn.Dense(features, dtype=config.dtype, param_dtype=jnp.float32,
                  kernel_init=_normal(config, names), bias_init=_zeros(names[1:]), name=name,
                  dot_general=cpu_layers.dense_dot_general if config.cpu_paths else None)


def layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  # Flax computes LayerNorm mean/variance in at least float32 whatever the input dtype.
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=config.dtype, param_dtype=jnp.float32,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (EMBED,)),
                      bias_init=_zeros((EMBED,)), name=name)


class Embeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout (+ ELECTRA projection)."""

  config: BertConfig

  def setup(self):
    cfg = self.config
    embed = functools.partial(nn.Embed, features=cfg.embedding_dim, dtype=cfg.dtype,
                              param_dtype=jnp.float32)
    self.word_embeddings = embed(cfg.vocab_size, embedding_init=_normal(cfg, (VOCAB, EMBED)))
    self.position_embeddings = embed(cfg.max_position_embeddings,
                                     embedding_init=_normal(cfg, (None, EMBED)))
    self.token_type_embeddings = embed(cfg.type_vocab_size, embedding_init=_normal(cfg, (None, EMBED)))
    self.layer_norm = layer_norm(cfg, "layer_norm")
    self.dropout = dropout(cfg, cfg.hidden_dropout)
    if cfg.embedding_dim != cfg.hidden_size:
      self.projection = dense(cfg, cfg.hidden_size, (EMBED_OUT, EMBED), "projection")

  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool,
               position_ids: Array | None = None, prompt: Array | None = None) -> Array:
    # input_ids, token_type_ids, position_ids (default 0, 1, ... per row): [batch, length]
    # -> [batch, length, hidden]. A `prompt` [virtual, embed] (prompt tuning) stands in for the
    # word embeddings of `virtual` tokens before the row, at positions 0 ... virtual - 1 with
    # token type 0; the row's tokens move up by `virtual`: [batch, virtual + length, hidden].
    if position_ids is None:
      position_ids = jnp.arange(input_ids.shape[1])[None]  # [1, length]
    words = self.word_embeddings(input_ids)  # [batch, length, embed]
    if prompt is not None:
      batch, virtual = input_ids.shape[0], prompt.shape[0]
      words = jnp.concatenate(
          [jnp.broadcast_to(prompt.astype(words.dtype), (batch, *prompt.shape)), words], axis=1)
      token_type_ids = jnp.concatenate(
          [jnp.zeros((batch, virtual), token_type_ids.dtype), token_type_ids], axis=1)
      position_ids = jnp.concatenate(
          [jnp.broadcast_to(jnp.arange(virtual)[None], (position_ids.shape[0], virtual)),
           position_ids + virtual], axis=1)
    x = (words
         + self.position_embeddings(position_ids)
         + self.token_type_embeddings(token_type_ids))
    x = self.dropout(self.layer_norm(x), deterministic=deterministic)
    if self.config.embedding_dim != self.config.hidden_size:
      x = self.projection(x)
    return x

  def attend(self, x: Array) -> Array:
    """Logits against the (tied) word-embedding table: [..., embed] -> [..., vocab]."""
    return self.word_embeddings.attend(x)


class SelfAttention(nn.Module):
  """Bidirectional multi-head self-attention with a fused QKV projection.

  `num_heads` heads of `config.head_dim` each: `config.num_heads` unless the layer was pruned
  (`BertConfig.pruned_heads`).
  """

  config: BertConfig
  num_heads: int | None = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               query_positions: Array | None = None, prefix: Array | None = None,
               lora: Hooks | None = None) -> Array:
    # x: [batch, length, hidden]; mask: [batch, 1, 1 or queries, length] bool, True = attend
    # (`attention_mask_4d`). Queries at `query_positions` ([batch, queries] int; all positions
    # when None). `prefix`: key/value prefixes every query attends to (`with_prefix`); `lora`:
    # this layer's LoRA paths (`with_lora`). [batch, queries, hidden] out.
    cfg = self.config
    heads = self.num_heads or cfg.num_heads
    param = functools.partial(self.param, dtype=jnp.float32)
    qkv_kernel = param("qkv_kernel", _normal(cfg, (EMBED, None, HEADS, KV)),
                       (cfg.hidden_size, 3, heads, cfg.head_dim))
    qkv_bias = param("qkv_bias", _zeros((None, HEADS, KV)), (3, heads, cfg.head_dim))

    def project(inputs: Array, parts: slice) -> Array:  # -> [batch, length, heads, parts, head_dim]
      # Heads (tensor-sharded) lead the kernel's output axes, as `cpu_layers.matmul_over_tokens`
      # needs to keep their sharding.
      kernel = jnp.swapaxes(qkv_kernel[:, parts], 1, 2)  # [hidden, heads, parts, head_dim]
      bias = jnp.swapaxes(qkv_bias[parts], 0, 1)  # [heads, parts, head_dim]
      out = contract(cfg, inputs, kernel.astype(cfg.dtype)) + bias.astype(cfg.dtype)
      names = QKV[parts]
      if not lora or not set(names) & set(lora):
        return out
      return jnp.stack([with_lora(self, out[:, :, :, i], inputs, lora, name, deterministic)
                        for i, name in enumerate(names)], axis=3)

    if query_positions is None:  # one fused QKV matmul
      qkv = project(x, slice(0, 3))
      q, k, v = (qkv[:, :, :, i] for i in range(3))  # each [batch, length, heads, head_dim]
    else:
      q = project(at_positions(x, query_positions), slice(0, 1))[:, :, :, 0]
      # q: [batch, queries, heads, head_dim]
      kv = project(x, slice(1, 3))
      k, v = kv[:, :, :, 0], kv[:, :, :, 1]
    if prefix is not None:
      k, v, mask = with_prefix(k, v, mask, prefix)
    q = nn.with_logical_constraint(q, (ACT_BATCH, ACT_LENGTH, ACT_HEADS, None))
    if deterministic or cfg.attention_dropout == 0.0:
      # Fused kernels on TPU/GPU; XLA reference on CPU. Softmax runs in float32 inside.
      context = jax.nn.dot_product_attention(q, k, v, mask=mask)
    else:
      # Dropout on the attention probabilities needs them materialised.
      logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32)
      logits = jnp.where(mask, logits * cfg.head_dim ** -0.5, jnp.finfo(jnp.float32).min)
      probs = dropout(cfg, cfg.attention_dropout)(jax.nn.softmax(logits, axis=-1),
                                                  deterministic=False)
      context = jnp.einsum("bnqk,bknh->bqnh", probs.astype(cfg.dtype), v)
    out_kernel = param("out_kernel", _normal(cfg, (HEADS, KV, EMBED)),
                       (heads, cfg.head_dim, cfg.hidden_size))
    out_bias = param("out_bias", _zeros((EMBED,)), (cfg.hidden_size,))
    out = contract(cfg, context, out_kernel.astype(cfg.dtype), axes=2) + out_bias.astype(cfg.dtype)
    return with_lora(self, out, context, lora or {}, "attention.output", deterministic,
                     axes=2)  # [batch, length, hidden]


class TransformerLayer(nn.Module):
  """Post-LN transformer block: x = LN(x + Attn(x)); x = LN(x + MLP(x)), with `num_heads`
  attention heads (None: `config.num_heads`)."""

  config: BertConfig
  num_heads: int | None = None

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool,
               positions: Array | None = None, hooks: Hooks | None = None) -> tuple[Array, None]:
    # x: [batch, length, hidden] -> [batch, outputs, hidden]: with `positions` ([batch, outputs]
    # int) the layer computes its output only there (keys and values still see every position).
    # `hooks`: this layer's PEFT hooks (a slice of `encoder/peft` without the layers axis).
    cfg = self.config
    hooks = hooks or {}
    lora = hooks.get(PEFT_LORA, {})
    drop = dropout(cfg, cfg.hidden_dropout)
    attended = SelfAttention(cfg, self.num_heads, name="attention")(
        x, mask, deterministic, positions, hooks.get(PEFT_PREFIX), lora)
    skip = at_positions(x, positions)
    attended = drop(attended, deterministic=deterministic)
    if PEFT_ATTENTION_ADAPTER in hooks:
      attended = bottleneck(cfg, attended, hooks[PEFT_ATTENTION_ADAPTER])
    x = layer_norm(cfg, "attention_norm")(skip + attended)
    h = with_lora(self, dense(cfg, cfg.intermediate_size, (EMBED, MLP), "intermediate")(x), x,
                  lora, "intermediate", deterministic)
    h = nn.with_logical_constraint(activation(cfg.hidden_act)(h), (ACT_BATCH, ACT_LENGTH, ACT_MLP))
    h = with_lora(self, dense(cfg, cfg.hidden_size, (MLP, EMBED), "output")(h), h, lora, "output",
                  deterministic)
    h = drop(h, deterministic=deterministic)
    if PEFT_OUTPUT_ADAPTER in hooks:
      h = bottleneck(cfg, h, hooks[PEFT_OUTPUT_ADAPTER])
    x = layer_norm(cfg, "output_norm")(x + h)
    x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    return x, None  # (carry, per-layer output) so the same module works under nn.scan


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _layer_class(config: BertConfig, scanned: bool) -> type[nn.Module]:
  if config.remat_policy == "none":
    return TransformerLayer
  return nn.remat(TransformerLayer, policy=_REMAT_POLICIES[config.remat_policy],
                  prevent_cse=not scanned, static_argnums=(3,))


def _scanned_depth(config: BertConfig) -> int:
  """How many (bottom) layers run in the `nn.scan`: all but the last with `scan_layers`."""
  return config.num_layers - 1 if config.scan_layers else 0


class BertEncoder(nn.Module):
  """Embeddings + transformer stack (+ pooler, created only when `pool` is used).

  The layers are `layer_0 ... layer_{L-1}`. With `scan_layers` all but the last are one
  `nn.scan` whose parameters are stacked along a leading `layers` axis (compile time nearly
  independent of depth), and the last stays `layer_{L-1}`, so that it can compute only the
  output positions. `jaxfm.models.layout` converts between the two layouts.
  """

  config: BertConfig

  def setup(self):
    cfg = self.config
    self.embeddings = Embeddings(cfg)
    scanned = _scanned_depth(cfg)
    if scanned:
      self.scanned_layers = nn.scan(_layer_class(cfg, scanned=True), variable_axes={"params": 0},
                                    split_rngs={"params": True, "dropout": True},
                                    in_axes=(nn.broadcast,) * 3 + (0,), length=scanned,
                                    metadata_params={nn.PARTITION_NAME: LAYERS}
                                    )(cfg, cfg.layer_heads(0), name="layers")
    layer = _layer_class(cfg, scanned=False)
    self.layers = [layer(cfg, cfg.layer_heads(i), name=f"layer_{i}")
                   for i in range(scanned, cfg.num_layers)]
    self.pooler = dense(cfg, cfg.hidden_size, (EMBED, EMBED_OUT), "pooler")

  def __call__(self, input_ids: Array, token_type_ids: Array, attention_mask: Array,
               deterministic: bool = True, output_positions: Array | None = None,
               segment_ids: Array | None = None, position_ids: Array | None = None) -> Array:
    """[batch, length] ids, types and 1/0 mask -> [batch, length, hidden] states.

    With `output_positions` ([batch, outputs] int) only those positions are returned
    ([batch, outputs, hidden]), and the last layer computes only those (its queries,
    attention output and MLP): the pooler reads position 0, the MLM head the masked positions.
    Packed rows (`jaxfm.data.packing`) add `segment_ids` (a token attends only within its own
    example) and `position_ids` (restarting per example), both [batch, length] int.

    PEFT hooks (`encoder/peft`, see the module docstring) as huggingface/peft runs them on
    transformers' BERT: a soft prompt of `virtual` tokens goes before each row, attended like
    real tokens; `output_positions` then index the prompt and row together (position 0, which
    the pooler reads, is the first virtual token), and without them only the row's own states
    return. Prefix tuning's keys and values count as `virtual` cached positions, so the row's
    positions start at `virtual` (transformers' `cache_length`), packed rows' likewise.
    """
    hooks = self.get_variable("params", PEFT) if self.has_variable("params", PEFT) else {}
    prompt, prefix = hooks.get(PEFT_PROMPT), hooks.get(PEFT_PREFIX)
    if prompt is not None:
      if segment_ids is not None:
        raise ValueError("a soft prompt (prompt tuning) cannot go before packed rows")
      attention_mask = jnp.concatenate(
          [jnp.ones((input_ids.shape[0], prompt.shape[0]), attention_mask.dtype), attention_mask],
          axis=1)
    if prefix is not None:
      if position_ids is None:
        position_ids = jnp.arange(input_ids.shape[1])[None]  # [1, length]
      position_ids = position_ids + prefix.shape[1]
    x = self.embeddings(input_ids, token_type_ids, deterministic, position_ids, prompt)
    x = nn.with_logical_constraint(x, (ACT_BATCH, ACT_LENGTH, ACT_EMBED))
    mask = attention_mask_4d(attention_mask, segment_ids)  # [batch, 1, 1 or length, length]
    per_layer = {k: v for k, v in hooks.items() if k in PEFT_PER_LAYER}  # [layers, ...] leaves
    scanned = _scanned_depth(self.config)
    if scanned:
      x, _ = self.scanned_layers(x, mask, deterministic, None,
                                 jax.tree.map(lambda a: a[:scanned], per_layer))
    # The layer-by-layer backward order pays only under remat: without it every activation is
    # kept anyway. With PEFT hooks no base weight has a gradient for it to schedule.
    layerwise = self.config.cpu_paths and self.config.remat_policy != "none" and not per_layer
    call = (cpu_layers.call_with_layerwise_grads if layerwise
            else lambda layer, *args: layer(*args)[0])
    for index, layer in enumerate(self.layers):
      own = jax.tree.map(lambda a, i=scanned + index: a[i], per_layer)
      args = (own,) if own else ()
      if index < len(self.layers) - 1 or output_positions is None:
        x = call(layer, x, mask, deterministic, None, *args)
      else:  # the last layer's queries at the output positions only
        x = call(layer, x, attention_mask_4d(attention_mask, segment_ids, output_positions),
                 deterministic, output_positions, *args)
    if prompt is not None and output_positions is None:
      x = x[:, prompt.shape[0]:]  # the row's own states
    return x

  def pool(self, first: Array) -> Array:
    """BERT pooler: tanh(dense(x)) of each example's first-token states [..., hidden]."""
    return jnp.tanh(self.pooler(first))

  def attend(self, x: Array) -> Array:
    return self.embeddings.attend(x)
