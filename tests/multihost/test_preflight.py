"""runtime.preflight in this process (8 fake CPU devices, see tests/conftest.py)."""

import re

import pytest

from jaxfm.config import ConfigError, pretrain_defaults
from jaxfm import runtime


def _cfg(data: int, fsdp: int = 1, tensor: int = 1, batch_size: int = 16):
  cfg = pretrain_defaults()
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = data, fsdp, tensor
  cfg.train.batch_size = batch_size
  return cfg


def test_prints_the_resolved_topology(capsys):
  runtime.preflight(_cfg(-1, fsdp=2))
  assert capsys.readouterr().out == ("topology: 1 process(es), 8 local / 8 global cpu devices, "
                                     "mesh {'data': 4, 'fsdp': 2, 'tensor': 1}\n")


@pytest.mark.parametrize("mesh,batch_size,message", [
    ((3, 1, 1), 16, "mesh.data=3, mesh.fsdp=1, mesh.tensor=1 does not match the 8 devices of "
                    "this run (1 process(es) x 8 local)"),
    ((-1, 3, 1), 16, "mesh.data=-1, mesh.fsdp=3, mesh.tensor=1 does not match the 8 devices"),
    ((2, 2, 2), 6, "train.batch_size=6 does not split over the 4 data-parallel shards "
                   "(mesh.data x mesh.fsdp) of mesh.data=2, mesh.fsdp=2, mesh.tensor=2"),
])
def test_mismatches_name_the_fields(mesh, batch_size, message, capsys):
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    runtime.preflight(_cfg(*mesh, batch_size=batch_size))
  assert "topology:" not in capsys.readouterr().out
