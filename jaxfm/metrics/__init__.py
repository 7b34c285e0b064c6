"""Evaluation metrics for fine-tuning tasks, in numpy: classification, NER and SQuAD."""
