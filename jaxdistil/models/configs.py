"""Typed model configs that read and write Hugging Face ``config.json`` files.

Field names are the ones of transformers' ``BertConfig``, ``DistilBertConfig``, ``RobertaConfig``
and ``GPT2Config`` so that a ``config.json`` round-trips unchanged. Every class exposes the same
read-only properties (``hidden``, ``layers``, ``heads``, ``mlp``, ``act``, ``causal``, ...) that the
shared layers consume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

ACTIVATIONS = ("gelu", "gelu_new", "relu")


class ConfigError(ValueError):
    """A model config that cannot be used (unknown activation, heads not dividing the width...)."""


def field_type(field: dataclasses.Field) -> type:
    """The plain type a config field holds (int / float / str / bool); a field whose default is None
    (GPT-2's optional ``pad_token_id``) holds an int."""
    return int if field.default is None else type(field.default)


def _check_common(name: str, hidden: int, heads: int, act: str) -> None:
    if act not in ACTIVATIONS:
        raise ConfigError(f"{name}: activation {act!r} is not supported; use one of {', '.join(ACTIVATIONS)}")
    if heads <= 0 or hidden % heads:
        raise ConfigError(f"{name}: hidden size {hidden} is not divisible by {heads} attention heads")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """transformers ``BertConfig`` (the fields that shape the model)."""

    model_type: ClassVar[str] = "bert"
    architecture: ClassVar[str] = "BertForMaskedLM"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        _check_common("BertConfig", self.hidden_size, self.num_attention_heads, self.hidden_act)

    # Shared view used by the layers.
    hidden = property(lambda self: self.hidden_size)
    layers = property(lambda self: self.num_hidden_layers)
    heads = property(lambda self: self.num_attention_heads)
    mlp = property(lambda self: self.intermediate_size)
    act = property(lambda self: self.hidden_act)
    dropout = property(lambda self: self.hidden_dropout_prob)
    # BertSelfOutput drops the attention block's output before its residual LayerNorm.
    attention_output_dropout = property(lambda self: self.hidden_dropout_prob)
    attention_dropout = property(lambda self: self.attention_probs_dropout_prob)
    ln_eps = property(lambda self: self.layer_norm_eps)
    token_types = property(lambda self: self.type_vocab_size)
    sinusoidal = property(lambda self: False)
    embedding_dropout = property(lambda self: self.hidden_dropout_prob)
    # Post-LN encoder, bidirectional attention, positions counted from 0.
    causal = property(lambda self: False)
    pre_ln = property(lambda self: False)
    position_offset = property(lambda self: 0)
    # The longest input: the position table's rows from position_offset on.
    max_tokens = property(lambda self: self.max_position_embeddings - self.position_offset)
    # The id that pads the rows of a batch.
    padding_id = property(lambda self: self.pad_token_id)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(model_type=self.model_type, architectures=[self.architecture])
        return out


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
    """transformers ``RobertaConfig``: BERT's encoder and MLM head (``lm_head``), positions counted
    from ``pad_token_id + 1`` (the padding position's row stays unused), one token type."""

    model_type: ClassVar[str] = "roberta"
    architecture: ClassVar[str] = "RobertaForMaskedLM"

    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 2

    def __post_init__(self):
        _check_common("RobertaConfig", self.hidden_size, self.num_attention_heads, self.hidden_act)

    position_offset = property(lambda self: self.pad_token_id + 1)


@dataclasses.dataclass(frozen=True)
class DistilBertConfig:
    """transformers ``DistilBertConfig`` (the fields that shape the model)."""

    model_type: ClassVar[str] = "distilbert"
    architecture: ClassVar[str] = "DistilBertForMaskedLM"

    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    qa_dropout: float = 0.1
    seq_classif_dropout: float = 0.2
    pad_token_id: int = 0

    def __post_init__(self):
        _check_common("DistilBertConfig", self.dim, self.n_heads, self.activation)

    hidden = property(lambda self: self.dim)
    layers = property(lambda self: self.n_layers)
    heads = property(lambda self: self.n_heads)
    mlp = property(lambda self: self.hidden_dim)
    act = property(lambda self: self.activation)
    # TransformerBlock: sa_layer_norm(attention output + x), no dropout on the attention output.
    attention_output_dropout = property(lambda self: 0.0)
    # DistilBERT's LayerNorms use a hard-coded eps of 1e-12 in transformers.
    ln_eps = property(lambda self: 1e-12)
    token_types = property(lambda self: 0)
    sinusoidal = property(lambda self: self.sinusoidal_pos_embds)
    embedding_dropout = property(lambda self: self.dropout)
    causal = property(lambda self: False)
    pre_ln = property(lambda self: False)
    position_offset = property(lambda self: 0)
    max_tokens = property(lambda self: self.max_position_embeddings)
    padding_id = property(lambda self: self.pad_token_id)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(model_type=self.model_type, architectures=[self.architecture], tie_weights_=True)
        return out


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """transformers ``GPT2Config`` (the fields that shape the model): pre-LN causal decoder, learned
    positions, no embedding LayerNorm, a final ``ln_f``, LM head tied to the token embeddings."""

    model_type: ClassVar[str] = "gpt2"
    architecture: ClassVar[str] = "GPT2LMHeadModel"

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int = 0  # config.json null: 4 * n_embd
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # GPT-2 has no padding token: None unless a config sets one (a sequence classifier needs it to
    # find each row's last token; transformers' GPT2ForSequenceClassification reads it from here).
    pad_token_id: int | None = None

    def __post_init__(self):
        _check_common("GPT2Config", self.n_embd, self.n_head, self.activation_function)
        if not self.scale_attn_weights or self.scale_attn_by_inverse_layer_idx:
            raise ConfigError("GPT2Config: only scale_attn_weights=true with scale_attn_by_inverse_layer_idx=false "
                              "(GPT-2's 1/sqrt(head width)) is supported")

    hidden = property(lambda self: self.n_embd)
    layers = property(lambda self: self.n_layer)
    heads = property(lambda self: self.n_head)
    mlp = property(lambda self: self.n_inner or 4 * self.n_embd)
    act = property(lambda self: self.activation_function)
    dropout = property(lambda self: self.resid_pdrop)
    attention_output_dropout = property(lambda self: self.resid_pdrop)
    attention_dropout = property(lambda self: self.attn_pdrop)
    embedding_dropout = property(lambda self: self.embd_pdrop)
    ln_eps = property(lambda self: self.layer_norm_epsilon)
    token_types = property(lambda self: 0)
    sinusoidal = property(lambda self: False)
    max_position_embeddings = property(lambda self: self.n_positions)
    causal = property(lambda self: True)
    pre_ln = property(lambda self: True)
    position_offset = property(lambda self: 0)
    max_tokens = property(lambda self: self.n_positions)
    # No [PAD] in GPT-2's vocabulary: LM batches are padded with <|endoftext|> under an attention
    # mask (or with pad_token_id when the config sets one).
    padding_id = property(lambda self: self.eos_token_id if self.pad_token_id is None else self.pad_token_id)

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["n_inner"] = self.n_inner or None
        out.update(model_type=self.model_type, architectures=[self.architecture], n_ctx=self.n_positions,
                   tie_word_embeddings=True)
        return out


ModelConfig = BertConfig | DistilBertConfig | RobertaConfig | GPT2Config
CONFIG_CLASSES: dict[str, type] = {"bert": BertConfig, "distilbert": DistilBertConfig, "roberta": RobertaConfig,
                                   "gpt2": GPT2Config}


def config_from_hf_dict(data: dict[str, Any], source: str = "config") -> ModelConfig:
    """Builds the typed config from a Hugging Face config dict; unknown HF extras are ignored."""
    model_type = data.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; jaxdistil reads "
            + ", ".join(repr(k) for k in CONFIG_CLASSES)
        )
    cls = CONFIG_CLASSES[model_type]
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names or value is None:
            continue
        kind = field_type(names[key])
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: field {key!r} should be {kind.__name__}, got {value!r}")
        kwargs[key] = value
    return cls(**kwargs)


def load_config(path: str | Path) -> ModelConfig:
    """Reads a Hugging Face ``config.json`` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: no config.json; pass a Hugging Face model directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); re-export the model or fix the file") from err
    return config_from_hf_dict(data, str(path))


def save_config(config: ModelConfig, path: str | Path) -> None:
    """Writes ``config.json`` in the Hugging Face format (``path`` is a directory)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
