"""gs:// end to end against a GCS API server on loopback (tests/gcs_emulator.py): gcsfs, etils
epath and Orbax's tensorstore writes all go to the emulator, in this process and in trainers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def test_every_layer_reaches_the_emulator(gcs_bucket):
  text = epath.Path(gcs_bucket) / "notes" / "a.txt"
  text.parent.mkdir(parents=True, exist_ok=True)
  text.write_text("through etils epath")
  state = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones((5,), jnp.int32)}
  with ocp.CheckpointManager(f"{gcs_bucket}/ckpt", item_names=("state",)) as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
    manager.wait_until_finished()
    restored = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(state)))
  jax.tree.map(np.testing.assert_array_equal, restored["state"], state)
  files = gcs_bucket.files()
  assert gcs_bucket.fs().cat(f"{gcs_bucket}/notes/a.txt") == b"through etils epath"
  # tensorstore's own writes: the OCDBT array data and manifest, on the emulator
  assert any(f.startswith("ckpt/1/state/ocdbt.process_0/d/") for f in files), files
  assert "ckpt/1/state/manifest.ocdbt" in files and "ckpt/1/commit_success.txt" in files
