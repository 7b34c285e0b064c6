r"""Tokenise and pack a pretraining corpus once, for runs that then start without reading it.

  python -m jaxfm.prepare --config=configs/pretrain/bert_base.py --out=DIR [--config.data.x=...]
  python -m jaxfm.pretrain --config=configs/pretrain/bert_base.py --workdir=runs/base \
      --config.data.prepared=DIR

The same config and overrides as `jaxfm.pretrain`: the corpus, tokenizer and packing fields of
`data` decide the examples (see `jaxfm.data.prepared`). Running the same command again
resumes an unfinished preparation, or verifies a finished one. `--workers=N` prepares N shards
at a time; on several hosts (`--host_index`/`--host_count`, or JAX's process index and count)
each prepares its own shards, and the last to finish writes the manifest.
"""

from __future__ import annotations

import os

import jax
from absl import flags
from etils import epath
from ml_collections import config_flags

from jaxfm import config as config_lib
from jaxfm import runtime
from jaxfm import workdir as workdir_lib
from jaxfm.data import prepared
from jaxfm.data.corpus import CorpusError
from jaxfm.data.tokenizer import TokenizerError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Folder to write the prepared corpus to (or gs://).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Shards prepared at a time, each in a process "
                                "of its own using one core; 0 = every core.")
_HOST_INDEX = flags.DEFINE_integer("host_index", None, "This host's index when several hosts "
                                   "prepare DIR together (default: jax.process_index()).")
_HOST_COUNT = flags.DEFINE_integer("host_count", None, "How many hosts prepare DIR together, "
                                   "each the shards v with v % host_count == host_index "
                                   "(default: jax.process_count()).")
flags.mark_flags_as_required(["config", "out"])

USER_ERRORS = (config_lib.ConfigError, workdir_lib.WorkdirError, prepared.PreparedError,
               CorpusError, TokenizerError)


def main(argv: list[str]) -> None:
  del argv
  jax.config.update("jax_platforms", "cpu")  # preparing never holds the accelerators
  cfg = _CONFIG.value
  with runtime.exit_on(USER_ERRORS):
    runtime.check_paths(cfg, out=_OUT.value)
    finished = (epath.Path(_OUT.value) / prepared.MANIFEST).exists()
    config_lib.validate_pretrain_data(cfg)
    host = jax.process_index() if _HOST_INDEX.value is None else _HOST_INDEX.value
    hosts = jax.process_count() if _HOST_COUNT.value is None else _HOST_COUNT.value
    if not 0 <= host < hosts:
      raise config_lib.ConfigError(f"--host_index={host} must be in [0, --host_count={hosts})")
    mine = range(host, cfg.data.num_shards, hosts)
    manifest = prepared.prepare(cfg.data, _OUT.value, None if hosts == 1 else mine,
                                workers=_WORKERS.value or os.cpu_count() or 1)
  if manifest is None:
    print(f"prepared shards {list(mine)} of {cfg.data.num_shards} in {_OUT.value}; the host "
          "that finishes the last shard writes the manifest")
    return
  shards = manifest["shards"]
  print(f"{'verified' if finished else 'prepared'} {_OUT.value}: {len(shards)} shard(s), "
        f"{sum(s['train']['examples'] for s in shards)} train / "
        f"{sum(s['eval']['examples'] for s in shards)} eval examples of "
        f"{manifest['record']['max_seq_length']} tokens ({manifest['record']['token_dtype']}), "
        f"vocabulary {manifest['tokenizer']['vocab_size']}")


def run() -> None:
  runtime.run_program(main)


if __name__ == "__main__":
  run()
