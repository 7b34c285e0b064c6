"""Fine-tuning: task kinds (`tasks`) and runs (`run`: finetune, evaluate, predict)."""
