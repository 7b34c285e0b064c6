r"""SST-2 with prompt tuning: 20 soft-prompt embeddings before each sentence, started from
the words of a task description; only they and the classifier train. Known to lag the other
methods on base-size models (Lester et al., 2021). Exports with
`python -m jaxfm.convert --to_peft --from=runs/sst2_prompt --out=DIR` (peft's PROMPT_TUNING).

  python -m jaxfm.finetune --config=configs/finetune/sst2_prompt.py --workdir=runs/sst2_prompt \
      --config.init_from=hf:/path/to/bert-base-uncased \
      --config.data.train_file=SST-2/train.tsv --config.data.dev_file=SST-2/dev.tsv
  python -m jaxfm.evaluate --workdir=runs/sst2_prompt --split=dev
"""

from jaxfm.config import recipe


def get_config():
  cfg = recipe(__file__, "sst2.py")
  cfg.peft.method = "prompt"
  cfg.peft.num_virtual_tokens = 20
  cfg.peft.prompt_init_text = "classify the sentiment of this movie review as positive or negative"
  cfg.optim.peak_learning_rate = 3e-2
  return cfg
