"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere, and one persistent
XLA compilation cache for the in-process tests (many compile the same tiny steps; a cache hit
loads the very executable a compile would make). Subprocesses keep their own caches."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_compilation_cache_dir",
                  os.path.join(tempfile.gettempdir(), "jaxfm-tests-jax-cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

from tests.gcs_emulator import gcs_bucket, gcs_server  # noqa: E402,F401  (fixtures for gs:// tests)
