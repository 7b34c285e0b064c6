"""Remat's memory saving in the compiled fine-tuning step on CPU (jaxfm.cpu: flags and paths)."""

import os
import subprocess
import sys

from jaxfm.cpu import process as cpu_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Compiles the fine-tuning classification step of a bert-mini-wide, 4-layer model (batch 32,
# seq 128) and prints the temporaries XLA allocates, without and with remat=full.
PROBE = """
import ml_collections
from jaxfm.config import pretrain_defaults
from jaxfm.tasks import make_task
from jaxfm.models import preset
from jaxfm.train import loop

def temporaries_mib(policy):
  config = preset("mini", vocab_size=1000, num_layers=4, max_position_embeddings=128,
                  remat_policy=policy, cpu_paths=True)
  task = make_task("classification", config, None, None,
                   ml_collections.ConfigDict({"max_seq_length": 128}))
  cfg = pretrain_defaults()
  cfg.train.batch_size, cfg.train.steps = 32, 10
  mesh = loop.make_mesh(cfg)
  steps = loop.build_steps(cfg, task, mesh)
  compiled, _ = loop.compile_train_step(steps, steps.abstract_batch(task, 32), mesh)
  return compiled.memory_analysis().temp_size_in_bytes / 2**20
print(temporaries_mib("none"), temporaries_mib("full"))
"""


def test_remat_full_cuts_the_fine_tuning_step_s_temporaries():
  # Without jaxfm.cpu's layer-by-layer order of the backward pass, XLA's memory scheduler leaves
  # every weight gradient to the end and remat=full saves little; without the recomputation's
  # offset input, XLA's CSE merges it into the forward pass and keeps its activations alive.
  env = {**os.environ, "XLA_FLAGS": cpu_process.with_default_xla_flags(""), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plain, remat = map(float, proc.stdout.split()[-2:])
  assert remat < 0.55 * plain, (plain, remat)
