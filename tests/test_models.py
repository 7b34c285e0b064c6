"""Model behaviour: heads' shapes, scan/remat equivalence, logical axes, dtypes, padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfm import sharding
from jaxfm.weights import in_layout
from jaxfm.models import (BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification,
                          BertForTokenClassification, BertModel, preset, stack_layers,
                          unstack_layers)

CFG = preset("tiny", vocab_size=300, num_layers=3, max_position_embeddings=64)


def _inputs(batch=2, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, CFG.vocab_size, (batch, length)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, length // 2:] = 1
  mask = np.ones_like(ids)
  mask[0, length - 4:] = 0  # padding at the end of the first example
  return ids, types, mask


def _init(model, *args):
  return sharding.unbox(model.init(jax.random.key(0), *args))["params"]


def test_heads_output_shapes():
  ids, types, mask = _inputs()
  positions = np.array([[1, 2, 3], [4, 5, 0]], np.int32)
  mlm = BertForMaskedLM(CFG)
  assert mlm.apply({"params": _init(mlm, ids, types, mask, positions)},
                   ids, types, mask, positions).shape == (2, 3, CFG.vocab_size)
  assert mlm.apply({"params": _init(mlm, ids, types, mask)}, ids, types, mask).shape == (
      2, 12, CFG.vocab_size)
  cls = BertForSequenceClassification(CFG, num_labels=3)
  assert cls.apply({"params": _init(cls, ids, types, mask)}, ids, types, mask).shape == (2, 3)
  tok = BertForTokenClassification(CFG, num_labels=5)
  assert tok.apply({"params": _init(tok, ids, types, mask)}, ids, types, mask).shape == (2, 12, 5)
  qa = BertForQuestionAnswering(CFG)
  start, end = qa.apply({"params": _init(qa, ids, types, mask)}, ids, types, mask)
  assert start.shape == end.shape == (2, 12)


@pytest.mark.parametrize("variant", [dict(), dict(remat_policy="full"), dict(scan_layers=True)])
def test_masked_positions_head_equals_full_head_gathered(variant):
  """At `masked_positions` the head and the encoder's last layer run only there: the same
  logits and parameter gradients as the full model's logits gathered afterwards."""
  ids, types, mask = _inputs()
  positions = np.array([[0, 3, 7], [2, 2, 11]], np.int32)  # a repeat, and a padded position
  model = BertForMaskedLM(CFG.replace(**variant))
  params = _init(model, ids, types, mask)

  def gathered_full(p):
    return jnp.take_along_axis(model.apply({"params": p}, ids, types, mask),
                               positions[..., None], 1)

  def masked(p):
    return model.apply({"params": p}, ids, types, mask, positions)

  np.testing.assert_allclose(masked(params), gathered_full(params), rtol=1e-5, atol=1e-5)
  probe = np.random.default_rng(2).normal(size=(2, 3, CFG.vocab_size)).astype(np.float32)
  g_full = jax.grad(lambda p: jnp.sum(gathered_full(p) * probe))(params)
  g_masked = jax.grad(lambda p: jnp.sum(masked(p) * probe))(params)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_masked)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()) + 1e-7)


def test_decoder_is_tied_to_word_embeddings():
  ids, types, mask = _inputs()
  params = _init(BertForMaskedLM(CFG), ids, types, mask)
  assert "decoder" not in str(jax.tree_util.tree_structure(params))
  assert set(params["mlm_head"]) == {"transform", "transform_norm", "bias"}


@pytest.mark.parametrize("variant", [
    dict(scan_layers=True), dict(remat_policy="full"), dict(remat_policy="dots"),
    dict(scan_layers=True, remat_policy="dots_no_batch")])
def test_scan_and_remat_match_plain_stack(variant):
  ids, types, mask = _inputs()
  plain = BertModel(CFG)
  params = _init(plain, ids, types, mask)
  other = BertModel(CFG.replace(**variant))
  other_params = stack_layers(params) if variant.get("scan_layers") else params
  expected = plain.apply({"params": params}, ids, types, mask)
  got = other.apply({"params": other_params}, ids, types, mask)
  for a, b in zip(expected, got):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

  probe = np.random.default_rng(1).normal(size=(2, 12, CFG.hidden_size)).astype(np.float32)

  def loss(p, model):  # a random projection: sum(h**2) would be constant under LayerNorm
    return jnp.sum(model.apply({"params": p}, ids, types, mask)[0] * probe)
  g_plain = jax.grad(loss)(params, plain)
  g_other = jax.grad(loss)(other_params, other)
  if variant.get("scan_layers"):
    g_other = unstack_layers(g_other)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_other)):
    # float32 summation order differs between the stacks: compare at the leaf's own scale.
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()))


def test_remat_gradients_in_training_mode_equal_plain_stack():
  # Dropout masks are drawn again in the recomputation, and the remat'd unrolled stack orders
  # its backward pass layer by layer (`_call_with_layerwise_grads`): neither changes a gradient.
  ids, types, mask = _inputs()

  def grads(config):
    model = BertForSequenceClassification(config, num_labels=3)
    params = _init(model, ids, types, mask)

    def loss(p):
      logits = model.apply({"params": p}, ids, types, mask, deterministic=False,
                           rngs={"dropout": jax.random.key(3)})
      return jnp.sum(logits * np.arange(1, 4, dtype=np.float32))
    return jax.jit(jax.grad(loss))(params)

  remat = grads(CFG.replace(remat_policy="full"))
  for a, b in zip(jax.tree.leaves(grads(CFG)), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(a).max()))


def test_stack_unstack_round_trip():
  ids, types, mask = _inputs()
  params = _init(BertModel(CFG), ids, types, mask)
  stacked = stack_layers(params)  # the bottom 2 of 3 layers stacked, the last kept apart
  assert stacked["encoder"]["layers"]["intermediate"]["kernel"].shape == (2, 128, 512)
  assert {k for k in stacked["encoder"] if k.startswith("layer")} == {"layers", "layer_2"}
  scanned = BertModel(CFG.replace(scan_layers=True))
  assert jax.tree.map(np.shape, _init(scanned, ids, types, mask)) == jax.tree.map(np.shape, stacked)
  back = unstack_layers(stacked)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
  # A stack of all three layers (an older jaxfm's scanned layout) converts too.
  every = {"encoder": {**{k: v for k, v in stacked["encoder"].items() if k != "layers"},
                       "layers": jax.tree.map(lambda s, last: np.concatenate([s, last[None]]),
                                              stacked["encoder"]["layers"],
                                              stacked["encoder"]["layer_2"])}}
  del every["encoder"]["layer_2"]
  converted = in_layout(every, CFG.replace(scan_layers=True))["encoder"]
  assert jax.tree.structure(converted) == jax.tree.structure(stacked["encoder"])
  for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(stacked["encoder"])):
    np.testing.assert_array_equal(a, b)


def test_padding_does_not_change_real_tokens():
  ids, types, mask = _inputs()
  model = BertModel(CFG)
  params = _init(model, ids, types, mask)
  hidden, _ = model.apply({"params": params}, ids, types, mask)
  changed = ids.copy()
  changed[0, -4:] = 7  # different tokens under the padding mask
  hidden2, _ = model.apply({"params": params}, changed, types, mask)
  np.testing.assert_allclose(hidden[0, :-4], hidden2[0, :-4], rtol=1e-6, atol=1e-6)


def test_every_parameter_has_logical_axis_names():
  ids, types, mask = _inputs()
  for model in (BertForMaskedLM(CFG.replace(scan_layers=True)), BertForSequenceClassification(CFG, 2)):
    boxed = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), ids, types, mask))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
    assert leaves and all(hasattr(x, "names") and len(x.names) == x.value.ndim for x in leaves)


def test_params_float32_compute_bfloat16():
  ids, types, mask = _inputs()
  model = BertForMaskedLM(CFG.replace(dtype="bfloat16"))
  params = _init(model, ids, types, mask)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  logits = model.apply({"params": params}, ids, types, mask)
  assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()
  ref = BertForMaskedLM(CFG).apply({"params": params}, ids, types, mask)
  assert np.abs(np.asarray(logits) - np.asarray(ref)).max() < 0.5  # bf16 rounding only


def test_dropout_is_used_in_training_mode_only():
  ids, types, mask = _inputs()
  model = BertModel(CFG)
  params = _init(model, ids, types, mask)
  det1 = model.apply({"params": params}, ids, types, mask)[0]
  det2 = model.apply({"params": params}, ids, types, mask, deterministic=True)[0]
  drop = model.apply({"params": params}, ids, types, mask, deterministic=False,
                     rngs={"dropout": jax.random.key(1)})[0]
  np.testing.assert_array_equal(det1, det2)
  assert np.abs(np.asarray(drop) - np.asarray(det1)).max() > 1e-3


def test_electra_style_factorised_embeddings():
  cfg = CFG.replace(embedding_size=64)
  ids, types, mask = _inputs()
  model = BertForMaskedLM(cfg)
  params = _init(model, ids, types, mask)
  assert params["encoder"]["embeddings"]["word_embeddings"]["embedding"].shape == (300, 64)
  assert params["encoder"]["embeddings"]["projection"]["kernel"].shape == (64, 128)
  assert model.apply({"params": params}, ids, types, mask).shape == (2, 12, 300)


@pytest.mark.parametrize("name", ["gelu", "gelu_new", "relu"])
def test_activation_backward_keeps_only_its_input(name, capsys):
  from jax.ad_checkpoint import print_saved_residuals
  from jaxfm.models.encoder import activation
  x = jnp.linspace(-3.0, 3.0, 32).reshape(4, 8)
  print_saved_residuals(activation(name), x)
  assert capsys.readouterr().out.strip().splitlines() == ["f32[4,8] from the argument x"]
  if name != "relu":  # and the same gradient as JAX's own GELU
    want = jax.grad(lambda v: jax.nn.gelu(v, approximate=name == "gelu_new").sum())(x)
    np.testing.assert_allclose(jax.grad(lambda v: activation(name)(v).sum())(x), want, rtol=1e-6)


@pytest.mark.parametrize("variant", [dict(), dict(remat_policy="full"), dict(scan_layers=True)])
def test_classifier_last_layer_at_first_token_only_matches_full_stack(variant):
  """The classifier's last layer computes position 0 only: same logits and gradients as the
  pooled output of the whole stack (BertModel) times the classifier."""
  ids, types, mask = _inputs()
  config = CFG.replace(**variant)
  cls = BertForSequenceClassification(config, num_labels=3)
  params = _init(cls, ids, types, mask)
  full = BertModel(config)

  def logits_full(p):
    pooled = full.apply({"params": {"encoder": p["encoder"]}}, ids, types, mask)[1]
    return pooled @ p["classifier"]["kernel"] + p["classifier"]["bias"]

  def logits_cls(p):
    return cls.apply({"params": p}, ids, types, mask)

  np.testing.assert_allclose(logits_cls(params), logits_full(params), rtol=1e-5, atol=1e-5)
  probe = np.random.default_rng(2).normal(size=(2, 3)).astype(np.float32)
  g_full = jax.grad(lambda p: jnp.sum(logits_full(p) * probe))(params)
  g_cls = jax.grad(lambda p: jnp.sum(logits_cls(p) * probe))(params)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_cls)):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(np.abs(a).max()) + 1e-7)
  # Training mode (attention dropout on the materialised probabilities) runs at both shapes too.
  train_logits = cls.apply({"params": params}, ids, types, mask, deterministic=False,
                           rngs={"dropout": jax.random.key(3)})
  assert train_logits.shape == (2, 3) and np.all(np.isfinite(train_logits))
