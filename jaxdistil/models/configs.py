"""Typed model configs that read and write Hugging Face ``config.json`` files.

Field names are the ones of transformers' ``BertConfig`` and ``DistilBertConfig`` so that a
``config.json`` round-trips unchanged. Both classes expose the same read-only properties
(``hidden``, ``layers``, ``heads``, ``mlp``, ``act``, ...) that the shared layers consume.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

ACTIVATIONS = ("gelu", "gelu_new", "relu")


class ConfigError(ValueError):
    """A model config that cannot be used (unknown activation, heads not dividing the width...)."""


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

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(model_type=self.model_type, architectures=[self.architecture])
        return out


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

    def to_hf_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(model_type=self.model_type, architectures=[self.architecture], tie_weights_=True)
        return out


ModelConfig = BertConfig | DistilBertConfig
CONFIG_CLASSES: dict[str, type] = {"bert": BertConfig, "distilbert": DistilBertConfig}


def config_from_hf_dict(data: dict[str, Any], source: str = "config") -> ModelConfig:
    """Builds the typed config from a Hugging Face config dict; unknown HF extras are ignored."""
    model_type = data.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not supported; jaxdistil reads 'bert' and 'distilbert'"
        )
    cls = CONFIG_CLASSES[model_type]
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names or value is None:
            continue
        kind = type(names[key].default)
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
