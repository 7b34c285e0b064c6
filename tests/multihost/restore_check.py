r"""Restores a workdir's newest checkpoint onto another mesh and reports what it finds (1 process).

  python -m tests.multihost.restore_check --workdir=W --mesh=2,4,1 --out=report.json

The report: the step, the restored params' mesh shapes, the leaves that differ bitwise from a
second restore onto one device, what `weights.load_jaxfm` (no target sharding) gives, and
the held-out MLM metrics of the restored params over the run's eval batches on the new mesh.
"""

from __future__ import annotations

import itertools
import json

import jax
import ml_collections
import numpy as np
from absl import app, flags
from etils import epath

from jaxfm import config as config_lib
from jaxfm import sharding, weights
from jaxfm.data import loader, mlm_data
from jaxfm.tasks import mlm_task
from jaxfm.train import checkpoint, loop

_WORKDIR = flags.DEFINE_string("workdir", None, "A jaxfm pretraining workdir.", required=True)
_MESH = flags.DEFINE_list("mesh", None, "data,fsdp,tensor of the new mesh.", required=True)
_OUT = flags.DEFINE_string("out", None, "Where the JSON report goes.", required=True)


def _differ(a: object, b: object) -> list[str]:
  """Paths of the leaves where `a` and `b` differ in structure, dtype or any bit."""
  flat_a, flat_b = (dict((jax.tree_util.keystr(p), np.asarray(v))
                         for p, v in jax.tree_util.tree_flatten_with_path(t)[0]) for t in (a, b))
  return sorted(k for k in flat_a.keys() | flat_b.keys()
                if k not in flat_a or k not in flat_b or flat_a[k].dtype != flat_b[k].dtype
                or flat_a[k].tobytes() != flat_b[k].tobytes())


def main(argv: list[str]) -> None:
  del argv
  workdir = _WORKDIR.value
  cfg = ml_collections.ConfigDict(
      json.loads((epath.Path(workdir) / "config.json").read_text())["config"])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = map(int, _MESH.value)
  task = mlm_task(config_lib.bert_config(cfg, jax.devices()[0].platform), cfg.data.max_seq_length,
                  cfg.data.max_predictions_per_seq)
  mesh = loop.make_mesh(cfg)
  steps = loop.build_steps(cfg, task, mesh)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  restored, single = [
      checkpoint.restore_latest(checkpoint.make_manager(workdir, cfg.train.keep_checkpoints),
                                target)
      for target in (steps.abstract_state, jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
          steps.abstract_state))]
  params = restored.state.params
  try:
    load_params = _differ(params, weights.load_jaxfm(workdir).params)
  except Exception as e:  # noqa: BLE001 - reported, the test decides
    load_params = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  data = mlm_data.build_pretraining_data(cfg.data, str(epath.Path(workdir) / "tokenizer"),
                                       max_position_embeddings=cfg.model.max_position_embeddings)
  with sharding.activation_sharding(mesh):
    layout = loader.HostLayout(cfg.train.batch_size, num_shards=cfg.data.num_shards)
    metrics = loop.evaluate(task, steps, params, itertools.islice(
        data.eval_batches(layout), cfg.train.eval_batches), mesh)
  leaves = jax.tree.leaves(params)
  report = {
      "step": restored.step,
      "mesh_shapes": sorted({str(dict(leaf.sharding.mesh.shape)) for leaf in leaves}),
      "sharded_leaves": sum(not leaf.sharding.is_fully_replicated for leaf in leaves),
      "leaves": len(leaves),
      "differ": _differ(params, single.state.params),
      "load_params": load_params,
      "eval": metrics,
  }
  epath.Path(_OUT.value).write_text(json.dumps(report))


if __name__ == "__main__":
  app.run(main)
