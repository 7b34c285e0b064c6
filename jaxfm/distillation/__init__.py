"""Knowledge distillation of fine-tuned encoders (`python -m jaxfm.distill`).

`losses` (soft targets, hidden-state MSE), `capture` (logits and hidden states read from
outside the model), `teacher` (a fine-tuning workdir, frozen), `student` (architecture and
starting params) and `run` (the runner over the shared loop).
"""
