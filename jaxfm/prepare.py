r"""Tokenise and pack a pretraining corpus once, for runs that then start without reading it.

  python -m jaxfm.prepare --config=configs/pretrain/bert_base.py --out=DIR [--config.data.x=...]
  python -m jaxfm.pretrain --config=configs/pretrain/bert_base.py --workdir=runs/base \
      --config.data.prepared=DIR

The same config and overrides as `jaxfm.pretrain`: the corpus, tokenizer and packing fields of
`data` decide the examples (see `jaxfm.data.prepared`). Running the same command again
resumes an unfinished preparation, or verifies a finished one.
"""

from __future__ import annotations

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
_OUT = flags.DEFINE_string("out", None, "Folder to write the prepared corpus to.")
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
    manifest = prepared.prepare(cfg.data, _OUT.value)
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
