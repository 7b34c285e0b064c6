"""10. A checkpoint saved on 8x1x1 restores bitwise onto other meshes and device counts."""

import jax
import pytest

from jaxfm.train import checkpoint
from tests.reliability.conftest import BASE, assert_trees_equal, copy_run

TARGETS = {"2x2x2": (2, 2, 2), "1x8x1": (1, 8, 1), "4_devices_4x1x1": (4, 1, 1),
           "4_devices_1x2x2": (1, 2, 2)}


def _mesh(shape: tuple[int, int, int]) -> dict[str, int]:
  return {**BASE, "mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]}


@pytest.fixture(scope="module")
def saved_on_8x1x1(reference, steps_for, tmp_path_factory):
  """(workdir, params) of a trained state re-saved from an 8x1x1 mesh."""
  source = copy_run(reference(BASE), tmp_path_factory.mktemp("mesh") / "source")
  abstract = steps_for(_mesh((8, 1, 1))).abstract_state
  state = checkpoint.restore_latest(checkpoint.make_manager(str(source), 3), abstract)
  assert {len(leaf.sharding.device_set) for leaf in jax.tree.leaves(state.state)} == {8}
  workdir = tmp_path_factory.mktemp("mesh") / "saved"
  manager = checkpoint.make_manager(str(workdir), 3)
  with checkpoint.finishing(manager):
    checkpoint.save(manager, state.step, state.state, state.data, state.meta)
  return workdir, jax.device_get(state.state.params)


@pytest.mark.parametrize("target", TARGETS)
def test_restores_bitwise_onto_another_mesh(saved_on_8x1x1, steps_for, target):
  workdir, params = saved_on_8x1x1
  shape = TARGETS[target]
  steps = steps_for(_mesh(shape), jax.devices()[:shape[0] * shape[1] * shape[2]])
  restored = checkpoint.restore_latest(checkpoint.make_manager(str(workdir), 3),
                                       steps.abstract_state)
  for leaf, want in zip(jax.tree.leaves(restored.state), jax.tree.leaves(steps.state_shardings)):
    assert leaf.sharding == want
  assert_trees_equal(jax.device_get(restored.state.params), params)


TARGETLESS = {
    "shapes_only": lambda a: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), a),
    "none": lambda a: None}


@pytest.mark.parametrize("target", TARGETLESS)
def test_restore_without_target_shardings_says_what_to_pass(saved_on_8x1x1, steps_for, target):
  workdir, _ = saved_on_8x1x1
  abstract = TARGETLESS[target](steps_for(_mesh((2, 2, 2))).abstract_state)
  with pytest.raises(checkpoint.CheckpointError, match=r"pass .*build_steps.*abstract_state"):
    checkpoint.restore_latest(checkpoint.make_manager(str(workdir), 3), abstract)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(BASE["train.steps"])]


def test_restore_into_another_model_says_so_and_leaves_the_checkpoint(saved_on_8x1x1, steps_for):
  workdir, _ = saved_on_8x1x1  # written by the unrolled stack
  abstract = steps_for({**_mesh((8, 1, 1)), "model.scan_layers": True}).abstract_state
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"written for another model: .* only in this run's model "
                           r"\(encoder/layers/.*model\.scan_layers.*left untouched"):
    checkpoint.restore_latest(checkpoint.make_manager(str(workdir), 3), abstract)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(BASE["train.steps"])]
