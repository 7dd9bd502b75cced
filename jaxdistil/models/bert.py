"""The BERT teacher: ``BertForMaskedLM`` as in transformers (token types, GELU MLM head, tied decoder)."""

from __future__ import annotations

from jaxdistil.models.configs import BertConfig
from jaxdistil.models.layers import TransformerMaskedLM


class BertForMaskedLM(TransformerMaskedLM):
    """BERT encoder + MLM head. ``cfg`` is a ``BertConfig``; parameter tree:

    embeddings/{word_embeddings,position_embeddings,token_type_embeddings,LayerNorm},
    encoder/layers/{q_lin,k_lin,v_lin,out_lin,sa_layer_norm,lin1,lin2,output_layer_norm} (stacked),
    mlm_head/{transform,transform_norm,bias}.
    """

    cfg: BertConfig
