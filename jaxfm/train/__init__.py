"""Training machinery shared by pretraining and fine-tuning: state, optimiser, step, loop, checkpoints."""
