"""MLM pretraining: the run that `python -m jaxfm.pretrain` starts."""
