"""Knowledge distillation of fine-tuned encoders (`python -m jaxfm.distill`).

`losses` (soft targets, hidden-state MSE, MiniLM relations), `capture` (logits, hidden states
and attention inputs read from outside the model), `teacher` (a fine-tuning workdir, frozen),
`cache` (the teacher's top-k logits on disk), `student` (architecture and starting params)
and `run` (the runner over the shared loop).
"""
