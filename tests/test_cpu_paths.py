"""jaxfm.cpu's model paths (`BertConfig.cpu_paths`) compute what the plain Flax path computes:
the same outputs and parameter gradients, for every layer layout and remat policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfm import sharding
from jaxfm.models import BertForMaskedLM, BertForSequenceClassification, preset

CFG = preset("tiny", vocab_size=300, num_layers=3, max_position_embeddings=64)


def _inputs(batch=2, length=12):
  rng = np.random.default_rng(0)
  ids = rng.integers(5, CFG.vocab_size, (batch, length)).astype(np.int32)
  types = np.zeros_like(ids)
  types[:, length // 2:] = 1
  mask = np.ones_like(ids)
  mask[0, length - 4:] = 0
  return ids, types, mask


def _assert_trees_close(a, b, rtol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    # float32 summation order differs between the paths: compare at the leaf's own scale.
    np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-5 * float(np.abs(x).max()) + 1e-7)


@pytest.mark.parametrize("variant", [
    dict(), dict(remat_policy="full"), dict(remat_policy="dots"), dict(scan_layers=True),
    dict(scan_layers=True, remat_policy="full")])
@pytest.mark.parametrize("head", ["mlm", "cls"])
def test_cpu_paths_give_the_plain_outputs_and_gradients(variant, head):
  ids, types, mask = _inputs()
  positions = np.array([[0, 3, 7], [2, 2, 11]], np.int32)
  args = (ids, types, mask, positions) if head == "mlm" else (ids, types, mask)

  def model(cpu_paths):
    config = CFG.replace(cpu_paths=cpu_paths, **variant)
    return (BertForMaskedLM(config) if head == "mlm"
            else BertForSequenceClassification(config, num_labels=3))

  plain, cpu = model(False), model(True)
  params = sharding.unbox(plain.init(jax.random.key(0), *args))["params"]
  probe = np.random.default_rng(1).normal(
      size=(2, 3, CFG.vocab_size) if head == "mlm" else (2, 3)).astype(np.float32)

  def loss(p, m):
    return jnp.sum(m.apply({"params": p}, *args) * probe)

  np.testing.assert_allclose(cpu.apply({"params": params}, *args),
                             plain.apply({"params": params}, *args), rtol=1e-5, atol=1e-5)
  _assert_trees_close(jax.jit(jax.grad(loss), static_argnums=1)(params, plain),
                      jax.jit(jax.grad(loss), static_argnums=1)(params, cpu), rtol=1e-4)


def test_cpu_paths_keep_the_parameter_tree():
  ids, types, mask = _inputs()
  shapes = [jax.tree.map(jnp.shape, jax.eval_shape(
      BertForSequenceClassification(CFG.replace(cpu_paths=c), 3).init, jax.random.key(0),
      ids, types, mask)) for c in (False, True)]
  assert shapes[0] == shapes[1]


@pytest.mark.parametrize("cpu_paths", [False, True])
def test_training_mode_gradients_are_finite_and_use_dropout(cpu_paths):
  ids, types, mask = _inputs()
  model = BertForSequenceClassification(CFG.replace(cpu_paths=cpu_paths,
                                                    remat_policy="full"), num_labels=3)
  params = sharding.unbox(model.init(jax.random.key(0), ids, types, mask))["params"]

  def loss(p, key):
    return jnp.sum(model.apply({"params": p}, ids, types, mask, deterministic=False,
                               rngs={"dropout": key}))
  g1, g2 = (jax.jit(jax.grad(loss))(params, jax.random.key(k)) for k in (1, 2))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(g1))
  assert any(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)))
