"""Fine-tuning runs (`run`: finetune, evaluate, predict); the task kinds are `jaxfm.tasks`."""
