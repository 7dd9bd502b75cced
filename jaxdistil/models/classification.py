"""Sequence classification / regression models, numerically equal to transformers'.

  BertForSequenceClassification        pooler (dense + tanh on [CLS]) -> dropout -> classifier
  DistilBertForSequenceClassification  first token -> pre_classifier -> ReLU -> dropout -> classifier

The encoder is the one of ``jaxdistil.models.layers`` (the parameters ``embeddings`` / ``encoder``
of a masked-LM model of the same config, so a pre-trained or distilled encoder drops in); the head
is ``ClassifierHead``: the number of labels, their names (``id2label``) and the problem type
(``single_label_classification``, or ``regression`` with one output, e.g. STS-B), read from and
written to the Hugging Face ``config.json`` fields.

Parameter trees: BERT {embeddings, encoder, pooler, classifier}; DistilBERT {embeddings, encoder,
pre_classifier, classifier}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistil.models.configs import BertConfig, ConfigError, DistilBertConfig, ModelConfig
from jaxdistil.models.layers import BATCH, TransformerEncoder, _normal, _zeros

PROBLEM_TYPES = ("single_label_classification", "regression")
HEAD_PARAMS = {"bert": ("pooler", "classifier"), "distilbert": ("pre_classifier", "classifier")}


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """What a sequence classifier predicts.

    num_labels: outputs (1 for regression); labels: their names in id order (``id2label``; empty:
    ``LABEL_0``...); problem_type: ``single_label_classification`` or ``regression``; dropout: BERT's
    ``classifier_dropout`` (None: its hidden dropout; DistilBERT uses ``seq_classif_dropout``).
    """

    num_labels: int = 2
    problem_type: str = "single_label_classification"
    labels: tuple[str, ...] = ()
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise ConfigError(f"problem_type {self.problem_type!r} is not supported; use one of "
                              f"{', '.join(PROBLEM_TYPES)}")
        if self.num_labels < 1:
            raise ConfigError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.problem_type == "regression" and self.num_labels != 1:
            raise ConfigError(f"a regression head has one output, got num_labels={self.num_labels}")
        if self.labels and len(self.labels) != self.num_labels:
            raise ConfigError(f"{len(self.labels)} label names for num_labels={self.num_labels}")

    @property
    def regression(self) -> bool:
        return self.problem_type == "regression"

    def label_names(self) -> tuple[str, ...]:
        return self.labels or tuple(f"LABEL_{i}" for i in range(self.num_labels))

    def to_hf_dict(self) -> dict[str, Any]:
        names = self.label_names()
        out = {"id2label": {str(i): n for i, n in enumerate(names)}, "label2id": {n: i for i, n in enumerate(names)},
               "problem_type": self.problem_type}
        if self.dropout is not None:
            out["classifier_dropout"] = self.dropout
        return out

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> ClassifierHead:
        """From a ``config.json``: id2label (or num_labels), problem_type, classifier_dropout."""
        id2label = data.get("id2label") or {}
        num = len(id2label) or int(data.get("num_labels", 2))
        names = tuple(str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(num)) if id2label else ()
        if names == tuple(f"LABEL_{i}" for i in range(num)):
            names = ()
        problem = data.get("problem_type") or ("regression" if num == 1 else "single_label_classification")
        return cls(num_labels=num, problem_type=problem, labels=names, dropout=data.get("classifier_dropout"))


def family_of(cfg: ModelConfig) -> str:
    """"bert" or "distilbert": the families with a sequence-classification head here."""
    if type(cfg) is BertConfig:
        return "bert"
    if type(cfg) is DistilBertConfig:
        return "distilbert"
    raise ConfigError(f"sequence classification supports BERT and DistilBERT encoders, not {cfg.model_type}; "
                      "fine-tune a BERT or DistilBERT model")


class SequenceClassifier(TransformerEncoder):
    """Encoder + the sequence-classification head of the config's family. Call -> logits [B, L]
    (float32). BERT: token_type_ids for sentence pairs; DistilBERT has none."""

    head: ClassifierHead = ClassifierHead()

    def setup(self):
        super().setup()
        cfg, std = self.cfg, self.cfg.initializer_range
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias_init=_zeros(("transform",)),
                     kernel_init=_normal(std, ("embed", "transform")))
        if family_of(cfg) == "bert":
            self.pooler = nn.Dense(cfg.hidden, **dense)
            rate = cfg.dropout if self.head.dropout is None else self.head.dropout
        else:
            self.pre_classifier = nn.Dense(cfg.hidden, **dense)
            rate = cfg.seq_classif_dropout
        self.head_dropout = nn.Dropout(rate)
        self.classifier = nn.Dense(self.head.num_labels, dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=_normal(std, ("transform", "labels")),
                                   bias_init=_zeros(("labels",)))

    def pooled(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        """hidden [B, T, D] -> the classifier's input [B, D] (dropout applied in train mode)."""
        first = nn.with_logical_constraint(hidden[:, 0], (BATCH, "activation_embed"))
        if family_of(self.cfg) == "bert":
            x = jnp.tanh(self.pooler(first))
        else:
            x = jax.nn.relu(self.pre_classifier(first))
        return self.head_dropout(x, deterministic=deterministic)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, deterministic: bool = True) -> jax.Array:
        enc = self.encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic)
        return self.classifier(self.pooled(enc.last_hidden_state, deterministic)).astype(jnp.float32)


def build_classifier(cfg: ModelConfig, head: ClassifierHead, dtype=jnp.float32, param_dtype=jnp.float32,
                     remat: bool = False, attention: str = "xla") -> SequenceClassifier:
    """The classifier of ``cfg``'s family; ``attention``: a resolved ``jaxdistil.models.attention`` name."""
    return SequenceClassifier(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, head=head, attention=attention)


def fresh_head(model: SequenceClassifier, rng: jax.Array) -> dict:
    """The head's parameters drawn as transformers initialises them (N(0, initializer_range)
    kernels, zero biases), for an encoder that comes without one."""
    params = nn.unbox(model.init(rng, jnp.zeros((1, 4), jnp.int32))["params"])
    return {k: params[k] for k in HEAD_PARAMS[family_of(model.cfg)]}
