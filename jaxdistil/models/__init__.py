"""Flax models numerically equal to transformers' PyTorch ones: BERT, DistilBERT, RoBERTa (masked
LM) and GPT-2 (causal LM)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistil.errors import UserError
from jaxdistil.models.bert import BertForMaskedLM
from jaxdistil.models.configs import (
    BertConfig,
    ConfigError,
    DistilBertConfig,
    GPT2Config,
    ModelConfig,
    RobertaConfig,
    config_from_hf_dict,
    load_config,
    save_config,
)
from jaxdistil.models.distilbert import DistilBertForMaskedLM
from jaxdistil.models.gpt2 import GPT2LMHeadModel
from jaxdistil.models.layers import EncoderOutput, MaskedLMOutput, TransformerMaskedLM
from jaxdistil.models.roberta import RobertaForMaskedLM

# Compute dtypes of the models (parameters stay float32). No float16: it would need loss scaling;
# bfloat16 has float32's range.
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "COMPUTE_DTYPES", "BertConfig", "BertForMaskedLM", "ConfigError", "DistilBertConfig", "DistilBertForMaskedLM",
    "EncoderOutput", "GPT2Config", "GPT2LMHeadModel", "MaskedLMOutput", "ModelConfig", "RobertaConfig",
    "RobertaForMaskedLM", "TransformerMaskedLM", "build_model",
    "config_from_hf_dict", "frozen_param_paths", "init_params", "load_config", "save_config",
]


MODEL_CLASSES = {BertConfig: BertForMaskedLM, DistilBertConfig: DistilBertForMaskedLM,
                 RobertaConfig: RobertaForMaskedLM, GPT2Config: GPT2LMHeadModel}


def build_model(cfg: ModelConfig, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                attention: str = "xla"):
    """The Flax module for a config (its LM: ``*ForMaskedLM``, or ``GPT2LMHeadModel``); ``attention``:
    a resolved implementation of ``jaxdistil.models.attention``."""
    return MODEL_CLASSES[type(cfg)](cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, attention=attention)


def init_params(model: TransformerMaskedLM, rng: jax.Array, length: int = 8, boxed: bool = False):
    """Random parameters (transformers' initialisation: N(0, initializer_range), zero biases).

    ``boxed=True`` keeps the ``nn.Partitioned`` wrappers that carry the logical axis names.
    """
    ids = jnp.zeros((1, length), jnp.int32)
    variables = model.init(rng, ids)
    params = variables["params"]
    return params if boxed else nn.unbox(params)


POSITIONS = "embeddings/position_embeddings/embedding"
TOKEN_TYPES = "embeddings/token_type_embeddings/embedding"


def frozen_param_paths(cfg: ModelConfig | None, freeze_positions: bool = False,
                       freeze_token_types: bool = False) -> tuple[str, ...]:
    """Parameters of a model that must not train (``/``-joined paths in its param tree).

    The position table when asked (the reference's ``--freeze_pos_embs``) or when the DistilBERT
    config has ``sinusoidal_pos_embds`` (transformers froze that table: ``requires_grad=False``);
    the token-type table when asked (``--freeze_token_type_embds``), which needs a model that has one.
    """
    frozen = []
    if freeze_positions or (cfg is not None and getattr(cfg, "sinusoidal", False)):
        frozen.append(POSITIONS)
    if freeze_token_types:
        if cfg is not None and not getattr(cfg, "token_types", 0):
            raise UserError(f"student.freeze_token_type_embds: the {type(cfg).__name__} student has no "
                            "token-type embeddings; remove the option")
        frozen.append(TOKEN_TYPES)
    return tuple(frozen)
