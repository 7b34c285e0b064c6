"""XLA:CPU tuning, switched on only when a run's devices are CPUs.

jaxfm is TPU-first; the CPU is its test bench. What pays only on XLA:CPU lives here, in one
room, and the rest of the package reaches it through one switch each:

- `process`: the CPU compiler's flags, huge-page malloc, handing freed heap back to the OS
  (entry points, before and after JAX starts: `targets_cpu`).
- `layers`: the encoder's matmuls as 2-D GEMMs and a layer-by-layer backward order
  (`BertConfig.cpu_paths`).
- `dropout`: dropout masks from a quarter of the random-number work (`BertConfig.cpu_paths`).
- `adamw`: AdamW in one pass per array (`make_optimizer(..., fused=True)`).

Each path is tested equal to the plain Flax/Optax path it replaces (`tests/test_cpu_paths.py`);
BENCHMARKS.md has what each one buys on CPU and what the TPU AOT compile says of it.
"""
