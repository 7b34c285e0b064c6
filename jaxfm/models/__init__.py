"""BERT-family models: pure Flax linen modules naming logical axes only."""

from jaxfm.models.config import PRESETS, BertConfig, preset
from jaxfm.models.encoder import BertEncoder
from jaxfm.models.heads import (BertForMaskedLM, BertForQuestionAnswering,
                                BertForSequenceClassification, BertForTokenClassification,
                                BertModel)
from jaxfm.models.layout import stack_layers, unstack_layers

__all__ = [
    "PRESETS", "BertConfig", "preset", "BertEncoder", "BertForMaskedLM", "BertForQuestionAnswering",
    "BertForSequenceClassification", "BertForTokenClassification", "BertModel", "stack_layers",
    "unstack_layers",
]
