"""Sharding on 8 fake CPU devices: same outputs on every mesh, parameters sharded per the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxfm import sharding
from jaxfm.models import BertForMaskedLM, preset
from jaxfm.train import loop
from tests import train_helpers

CFG = preset("tiny", vocab_size=512, num_layers=2, max_position_embeddings=64)


def _setup():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, CFG.vocab_size, (8, 16)).astype(np.int32)
  types = np.zeros_like(ids)
  mask = np.ones_like(ids)
  mask[::2, 12:] = 0
  positions = rng.integers(0, 12, (8, 4)).astype(np.int32)
  model = BertForMaskedLM(CFG)
  params = sharding.unbox(model.init(jax.random.key(0), ids, types, mask, positions))["params"]
  return model, params, (ids, types, mask, positions)


def _sharded_forward(shape, model, params, inputs):
  count = 8 if -1 in shape else int(np.prod(shape))
  mesh = sharding.make_mesh(shape, jax.devices()[:count])
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))["params"]
  shardings = sharding.unbox(sharding.logical_shardings(boxed, mesh))
  placed = jax.device_put(params, shardings)
  batch = [jax.device_put(x, sharding.batch_sharding(mesh)) for x in inputs]
  with sharding.activation_sharding(mesh):
    out = jax.jit(lambda p, *xs: model.apply({"params": p}, *xs))(placed, *batch)
  return placed, np.asarray(out)


def test_eight_fake_devices_available():
  assert jax.device_count() == 8


@pytest.mark.parametrize("shape", [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2), (-1, 1, 2)])
def test_same_outputs_on_every_mesh(shape):
  model, params, inputs = _setup()
  expected = np.asarray(model.apply({"params": params}, *inputs))
  _, got = _sharded_forward(shape, model, params, inputs)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


def test_parameters_are_sharded_as_the_rules_say():
  model, params, inputs = _setup()
  placed, _ = _sharded_forward((2, 2, 2), model, params, inputs)
  layer = placed["encoder"]["layer_0"]
  assert layer["attention"]["qkv_kernel"].sharding.spec == P("fsdp", None, "tensor", None)
  assert layer["attention"]["out_kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert layer["intermediate"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layer["output"]["kernel"].sharding.spec == P("tensor", "fsdp")
  embedding = placed["encoder"]["embeddings"]["word_embeddings"]["embedding"]
  assert embedding.sharding.spec == P("tensor", "fsdp")
  # Each device holds 1/4 of the (512 x 128) table: split 2 ways on each dim.
  assert embedding.addressable_shards[0].data.shape == (256, 64)
  assert layer["attention_norm"]["scale"].sharding.spec == P("fsdp")


def test_indivisible_dimension_is_replicated_not_an_error():
  cfg = CFG.replace(vocab_size=511)
  model = BertForMaskedLM(cfg)
  ids = np.ones((8, 16), np.int32)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, ids))["params"]
  mesh = sharding.make_mesh((2, 2, 2))
  shardings = sharding.logical_shardings(boxed, mesh)
  spec = sharding.unbox(shardings)["encoder"]["embeddings"]["word_embeddings"]["embedding"].spec
  assert spec == P(None, "fsdp")


@pytest.mark.parametrize("shape,devices,message", [
    ((3, -1, 1), 8, "not divisible"), ((2, 2, 1), 8, "needs 4 devices"),
    ((-1, -1, 1), 8, "needs 64 devices"), ((0, 1, 1), 8, "needs 0 devices")])
def test_bad_mesh_shapes(shape, devices, message):
  with pytest.raises(ValueError, match=message):
    sharding.resolve_mesh_shape(shape, devices)


def test_global_batch_from_host_local_slices():
  mesh = sharding.make_mesh((4, 2, 1))
  local = {"x": np.arange(32, dtype=np.int32).reshape(16, 2)}
  batch = sharding.global_batch(local, mesh)
  assert batch["x"].shape == (16, 2)
  assert batch["x"].sharding.spec == P(("data", "fsdp"))
  np.testing.assert_array_equal(np.asarray(batch["x"]), local["x"])
  assert sharding.local_batch_size(16, mesh) == 16
  with pytest.raises(ValueError, match="does not split over the 8 data-parallel shards"):
    sharding.local_batch_size(12, mesh)


def test_tensor_parallel_train_step_keeps_kernels_sharded():
  # Under tensor parallelism the heads and MLP kernels stay split: a step that all-gathers a
  # kernel (e.g. one reshaped so that its sharded axis is no longer the major one of a merged
  # axis) computes the whole projection on every device.
  cfg = train_helpers.tiny_config(batch_size=8)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 4, 1, 2
  task = train_helpers.mlm_task(cfg)
  mesh = loop.make_mesh(cfg)
  steps = loop.build_steps(cfg, task, mesh)
  compiled, _ = loop.compile_train_step(
      steps, steps.abstract_batch(task, cfg.train.batch_size), mesh)
  hlo = compiled.as_text()
  assert " all-reduce(" in hlo or " all-reduce-start(" in hlo  # the partial sums
  assert "all-gather" not in hlo
