"""The RoBERTa teacher / student: ``RobertaForMaskedLM`` as in transformers.

BERT's encoder and MLM head (``lm_head``: dense -> GELU -> LayerNorm -> tied decoder + bias) with
RoBERTa's positions (``pad_token_id + 1`` onwards, computed from the ids when not given) and its one
token type. A student is the same architecture with fewer layers, initialised from teacher layers.
"""

from __future__ import annotations

from jaxdistil.models.configs import RobertaConfig
from jaxdistil.models.layers import TransformerMaskedLM


class RobertaForMaskedLM(TransformerMaskedLM):
    """RoBERTa encoder + LM head; the parameter tree of ``BertForMaskedLM``."""

    cfg: RobertaConfig
