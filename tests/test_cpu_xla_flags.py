"""jaxfm's default XLA flags: added unless the user names them, and in force in the entry points."""

import os
import subprocess
import sys

import pytest

from jaxfm.cpu import process as cpu_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Imports an entry point (nothing may start JAX's backends at import), does what its main()
# does first, then compiles a matmul and says who runs it.
PROBE = """
import jaxfm.{module}
from jaxfm import runtime
runtime.initialize_runtime({width})
import jax, jax.numpy as jnp
x = jnp.ones((64, 64))
print("YNNPACK" if "__ynn_fusion" in jax.jit(jnp.dot).lower(x, x).compile().as_text() else "XLA")
"""


YNN = "--xla_cpu_experimental_ynn_fusion_type=reduce"
DFS = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"


def test_defaults_are_added_only_for_flags_not_named():
  assert cpu_process.with_default_xla_flags("") == f"{YNN} {DFS}"
  assert cpu_process.with_default_xla_flags("--xla_force_host_platform_device_count=8") == (
      f"{YNN} {DFS} --xla_force_host_platform_device_count=8")
  mine = "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce"
  assert cpu_process.with_default_xla_flags(mine) == f"{DFS} {mine}"
  for theirs in ("--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED",
                 "--xla_cpu_enable_concurrency_optimized_scheduler=true"):  # the older spelling
    assert cpu_process.with_default_xla_flags(theirs) == f"{YNN} {theirs}"


def test_models_narrower_than_bert_mini_keep_xla_s_defaults():
  assert cpu_process.with_default_xla_flags("", model_width=256) == f"{YNN} {DFS}"
  assert cpu_process.with_default_xla_flags("--xla_force_host_platform_device_count=8",
                                          model_width=128) == (
      "--xla_force_host_platform_device_count=8")


@pytest.mark.parametrize("module, width, user_flags, runs_the_dot", [
    ("pretrain", 256, "", "XLA"), ("finetune", None, "", "XLA"), ("evaluate", None, "", "XLA"),
    ("predict", None, "", "XLA"), ("pretrain", 128, "", "YNNPACK"),
    ("pretrain", 768, "--xla_cpu_experimental_ynn_fusion_type=individual_dot,reduce", "YNNPACK")])
def test_entry_points_compile_with_the_defaults_unless_overridden(module, width, user_flags,
                                                                   runs_the_dot):
  env = {**os.environ, "XLA_FLAGS": user_flags, "JAX_PLATFORMS": "cpu"}
  probe = PROBE.format(module=module, width=width)
  proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split()[-1] == runs_the_dot
