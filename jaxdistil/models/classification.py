"""Sequence classification / regression models, numerically equal to transformers'.

  BertForSequenceClassification        pooler (dense + tanh on [CLS]) -> dropout -> classifier
  DistilBertForSequenceClassification  first token -> pre_classifier -> ReLU -> dropout -> classifier
  RobertaForSequenceClassification     first token (<s>) -> dropout -> dense -> tanh -> dropout -> out_proj
                                       (RobertaClassificationHead; no pooler)
  GPT2ForSequenceClassification        the last non-padding token -> score (no bias); see ``last_token``

The encoder is the one of ``jaxdistil.models.layers`` (the parameters ``embeddings`` / ``encoder``
of a language model of the same config, so a pre-trained or distilled encoder drops in); the head
is ``ClassifierHead``: the number of labels, their names (``id2label``) and the problem type
(``single_label_classification``, or ``regression`` with one output, e.g. STS-B), read from and
written to the Hugging Face ``config.json`` fields.

Parameter trees: BERT {embeddings, encoder, pooler, classifier}; DistilBERT {embeddings, encoder,
pre_classifier, classifier}; RoBERTa {embeddings, encoder, classifier: {dense, out_proj}}; GPT-2
{embeddings, encoder, score}.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistil.models.configs import (
    BertConfig,
    ConfigError,
    DistilBertConfig,
    GPT2Config,
    ModelConfig,
    RobertaConfig,
)
from jaxdistil.models.layers import BATCH, TransformerEncoder, _normal, _zeros

PROBLEM_TYPES = ("single_label_classification", "regression")
HEAD_PARAMS = {"bert": ("pooler", "classifier"), "distilbert": ("pre_classifier", "classifier"),
               "roberta": ("classifier",), "gpt2": ("score",)}
_FAMILIES = {BertConfig: "bert", DistilBertConfig: "distilbert", RobertaConfig: "roberta", GPT2Config: "gpt2"}


@dataclasses.dataclass(frozen=True)
class ClassifierHead:
    """What a sequence classifier predicts.

    num_labels: outputs (1 for regression); labels: their names in id order (``id2label``; empty:
    ``LABEL_0``...); problem_type: ``single_label_classification`` or ``regression``; dropout: BERT's
    and RoBERTa's ``classifier_dropout`` (None: their hidden dropout; DistilBERT uses
    ``seq_classif_dropout``, GPT-2's head has none).
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
    """"bert", "distilbert", "roberta" or "gpt2": the family of a config's sequence classifier."""
    if type(cfg) not in _FAMILIES:
        raise ConfigError(f"sequence classification supports BERT, DistilBERT, RoBERTa and GPT-2 models, not "
                          f"{getattr(cfg, 'model_type', type(cfg).__name__)}")
    return _FAMILIES[type(cfg)]


def check_classifier_config(cfg: ModelConfig) -> str:
    """The family of ``cfg`` (``family_of``), once checked that it can classify: a GPT-2 needs a
    ``pad_token_id`` to find each row's last token (transformers refuses batches without one)."""
    family = family_of(cfg)
    if family == "gpt2" and cfg.pad_token_id is None:
        raise ConfigError("the GPT-2 config has no pad_token_id, which its sequence classifier needs to find "
                          "each row's last token; set one, e.g. model_config.pad_token_id="
                          f"{cfg.eos_token_id} (its <|endoftext|>) or \"pad_token_id\" in its config.json")
    return family


def token_types(cfg: ModelConfig) -> bool:
    """Whether the classifier reads token types (BERT's sentence-pair segments; RoBERTa has one
    type only, DistilBERT and GPT-2 none)."""
    return family_of(cfg) == "bert"


def last_token(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """[B] index of each row's last token, as transformers' GPT2ForSequenceClassification finds it:
    the rightmost position whose id is not ``pad_token_id`` (from the ids, not the attention mask,
    so left and right padding both work; a real token equal to the pad id counts as padding at the
    end of a row; a row of pad ids only gives 0)."""
    positions = jnp.arange(input_ids.shape[-1], dtype=jnp.int32)
    return jnp.argmax(positions * (input_ids != pad_token_id).astype(jnp.int32), axis=-1)


class RobertaClassificationHead(nn.Module):
    """transformers' RobertaClassificationHead on the first token's hidden state [B, D] -> logits
    [B, L]: dropout -> dense -> tanh -> dropout -> out_proj (the same rate twice)."""

    cfg: Any
    num_labels: int
    rate: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        std = self.cfg.initializer_range
        self.dense = nn.Dense(self.cfg.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                              kernel_init=_normal(std, ("embed", "transform")), bias_init=_zeros(("transform",)))
        self.out_proj = nn.Dense(self.num_labels, dtype=self.dtype, param_dtype=self.param_dtype,
                                 kernel_init=_normal(std, ("transform", "labels")), bias_init=_zeros(("labels",)))
        # Two modules of one rate (transformers calls its one dropout twice): one mask each.
        self.dropout_in = nn.Dropout(self.rate)
        self.dropout_out = nn.Dropout(self.rate)

    def __call__(self, first: jax.Array, deterministic: bool = True) -> jax.Array:
        x = jnp.tanh(self.dense(self.dropout_in(first, deterministic=deterministic)))
        return self.out_proj(self.dropout_out(x, deterministic=deterministic))


class SequenceClassifier(TransformerEncoder):
    """Encoder + the sequence-classification head of the config's family. Call -> logits [B, L]
    (float32). BERT: token_type_ids for sentence pairs; the other families have none (RoBERTa's one
    type is always 0). GPT-2 needs the attention mask of padded rows and pools the last token."""

    head: ClassifierHead = ClassifierHead()

    def setup(self):
        super().setup()
        cfg, std = self.cfg, self.cfg.initializer_range
        family = check_classifier_config(cfg)
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias_init=_zeros(("transform",)),
                     kernel_init=_normal(std, ("embed", "transform")))
        hidden_rate = cfg.dropout if self.head.dropout is None else self.head.dropout
        if family == "roberta":
            self.classifier = RobertaClassificationHead(cfg, self.head.num_labels, hidden_rate, self.dtype,
                                                        self.param_dtype)
            return
        if family == "gpt2":
            self.score = nn.Dense(self.head.num_labels, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=_normal(std, ("embed", "labels")))
            return
        if family == "bert":
            self.pooler = nn.Dense(cfg.hidden, **dense)
            rate = hidden_rate
        else:
            self.pre_classifier = nn.Dense(cfg.hidden, **dense)
            rate = cfg.seq_classif_dropout
        self.head_dropout = nn.Dropout(rate)
        self.classifier = nn.Dense(self.head.num_labels, dtype=self.dtype, param_dtype=self.param_dtype,
                                   kernel_init=_normal(std, ("transform", "labels")),
                                   bias_init=_zeros(("labels",)))

    def pooled(self, hidden: jax.Array, deterministic: bool = True) -> jax.Array:
        """BERT / DistilBERT: hidden [B, T, D] -> the classifier's input [B, D] (dropout applied in
        train mode)."""
        first = nn.with_logical_constraint(hidden[:, 0], (BATCH, "activation_embed"))
        if family_of(self.cfg) == "bert":
            x = jnp.tanh(self.pooler(first))
        else:
            x = jax.nn.relu(self.pre_classifier(first))
        return self.head_dropout(x, deterministic=deterministic)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 segment_ids=None, deterministic: bool = True) -> jax.Array:
        enc = self.encode(input_ids, attention_mask, token_type_ids, position_ids, segment_ids, deterministic)
        hidden = enc.last_hidden_state
        family = family_of(self.cfg)
        if family == "gpt2":
            # transformers scores every position, then picks each row's last token; picking first
            # gives the same logits with one row per sequence.
            last = hidden[jnp.arange(hidden.shape[0]), last_token(input_ids, self.cfg.pad_token_id)]
            logits = self.score(nn.with_logical_constraint(last, (BATCH, "activation_embed")))
        elif family == "roberta":
            first = nn.with_logical_constraint(hidden[:, 0], (BATCH, "activation_embed"))
            logits = self.classifier(first, deterministic)
        else:
            logits = self.classifier(self.pooled(hidden, deterministic))
        return logits.astype(jnp.float32)


def build_classifier(cfg: ModelConfig, head: ClassifierHead, dtype=jnp.float32, param_dtype=jnp.float32,
                     remat: bool = False, attention: str = "xla") -> SequenceClassifier:
    """The classifier of ``cfg``'s family; ``attention``: a resolved ``jaxdistil.models.attention`` name."""
    check_classifier_config(cfg)
    return SequenceClassifier(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, head=head, attention=attention)


def fresh_head(model: SequenceClassifier, rng: jax.Array) -> dict:
    """The head's parameters drawn as transformers initialises them (N(0, initializer_range)
    kernels, zero biases), for an encoder that comes without one."""
    params = nn.unbox(model.init(rng, jnp.zeros((1, 4), jnp.int32))["params"])
    return {k: params[k] for k in HEAD_PARAMS[family_of(model.cfg)]}
