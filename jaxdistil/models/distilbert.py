"""The DistilBERT student: ``DistilBertForMaskedLM`` as in transformers (no token types)."""

from __future__ import annotations

from jaxdistil.models.configs import DistilBertConfig
from jaxdistil.models.layers import TransformerMaskedLM


class DistilBertForMaskedLM(TransformerMaskedLM):
    """DistilBERT encoder + MLM head (vocab_transform, vocab_layer_norm, tied vocab_projector).

    Same parameter tree as ``BertForMaskedLM`` without ``token_type_embeddings``: a student
    initialised from teacher layers is an index into the stacked ``encoder/layers`` arrays.
    """

    cfg: DistilBertConfig
