r"""Post-training int8 quantization of a fine-tuning workdir.

  python -m jaxfm.quantize --workdir=runs/sst2 --out=runs/sst2-int8 [--mode=weight_only|w8a8]

Writes an int8 folder (`jaxfm.compress.int8_dir`) from the workdir's best (else latest)
checkpoint: every matmul kernel and embedding table as int8 with per-channel float32 scales,
beside copies of the workdir's config, labels and tokenizer. `weight_only` computes in float
with the dequantized weights; `w8a8` also quantizes each matmul's activations per token and
multiplies in int8. Without `--mode`, a quantization-aware run (`quantize.qat`) gets the mode
it trained for (its evals scored this folder's model), any other run w8a8. Prints one JSON
line (mode, source checkpoint, bytes); on error prints one line and exits with status 1.
"""

from __future__ import annotations

import json
import sys

import jax
from absl import app, flags

from jaxfm.compress import MODES, int8_dir

_WORKDIR = flags.DEFINE_string("workdir", None, "A jaxfm fine-tuning workdir.")
_OUT = flags.DEFINE_string("out", None, "The int8 folder to write; must not exist or be empty.")
_MODE = flags.DEFINE_string("mode", "", f"One of {', '.join(MODES)}; '' = the mode a "
                            "quantization-aware run trained for (quantize.qat), else w8a8.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  # Quantization is host work: never take an accelerator a training job may be using.
  jax.config.update("jax_platforms", "cpu")
  try:
    if not _WORKDIR.value or not _OUT.value:
      raise ValueError("--workdir and --out are required")
    print(json.dumps(int8_dir.write(_WORKDIR.value, _OUT.value, _MODE.value)))
  except (ValueError, OSError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
