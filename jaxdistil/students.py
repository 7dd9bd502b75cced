"""The teacher and the student of a run: loading the teacher, shaping and initialising the student.

A student is initialised from a teacher's layers as the reference's ``extract_distilbert.py`` does.

A BERT teacher gets a DistilBERT student (the paper's); a RoBERTa or GPT-2 teacher gets a student
of its own architecture with fewer layers (the reference's ``extract.py``; GPT-2 keeps its final
``ln_f``). The student keeps the teacher's word and position embeddings, its embedding LayerNorm, a
chosen subset of its encoder layers and its MLM head. Because every model shares one parameter tree (see
``jaxdistil.models.layers``) with the layers stacked on a leading axis, "take layers 0, 2, 4, 7, 9,
11" is one ``take`` on every ``encoder/layers`` array; the BERT -> DistilBERT renaming
(query -> q_lin, intermediate.dense -> ffn.lin1, ...) only exists at the Hugging Face boundary.

Token types: DistilBERT has none. The reference simply drops BERT's token-type table, so a student
built that way sees every embedding shifted by ``token_type_embeddings[0]`` compared with its
teacher. With ``fold_token_types`` (default) we add that row to every position embedding instead:
on token-type-0 input (all the distillation data) the student's embeddings then equal the
teacher's exactly, and a student made of *all* the teacher's layers is the teacher.

``resolve_teacher`` / ``resolve_student`` turn a run config into the models ``train`` uses (the
command ``jaxdistil init-student`` writes such a student to a directory).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxdistil.data import manifest as manifest_lib
from jaxdistil.errors import UserError
from jaxdistil.hf import LoadedModel
from jaxdistil.hf.load import load_model_arg
from jaxdistil.models import (
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    ModelConfig,
    RobertaConfig,
    config_from_hf_dict,
)
from jaxdistil.models.configs import ConfigError

PAPER_LAYERS = (0, 2, 4, 7, 9, 11)


# Fields of each student class that shape a tensor (a student copied from teacher layers keeps them).
_SHAPED = {
    DistilBertConfig: {"vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim"},
    RobertaConfig: {"vocab_size", "max_position_embeddings", "num_hidden_layers", "num_attention_heads",
                    "hidden_size", "intermediate_size", "type_vocab_size", "pad_token_id"},
    GPT2Config: {"vocab_size", "n_positions", "n_layer", "n_head", "n_embd", "n_inner"},
}
_DEPTH = {DistilBertConfig: "n_layers", RobertaConfig: "num_hidden_layers", GPT2Config: "n_layer"}


def student_class(teacher: ModelConfig) -> type:
    """The student architecture of a teacher: BERT -> DistilBERT (the paper's student), others
    (DistilBERT, RoBERTa, GPT-2) -> the same architecture, fewer layers (the reference's extract.py)."""
    return DistilBertConfig if type(teacher) is BertConfig else type(teacher)


def student_config_from_teacher(
    teacher: ModelConfig, n_layers: int, overrides: dict[str, Any] | None = None
) -> ModelConfig:
    """The student config with the teacher's shape and ``n_layers`` layers (``student_class``).

    ``overrides``: config.json fields of the student to change (e.g. ``{"dropout": 0.0}``); fields
    that would change a tensor shape (dim, hidden_dim, n_heads, vocab_size, ...) are refused since
    the student's tensors are copied from the teacher.
    """
    cls = student_class(teacher)
    if cls is not DistilBertConfig:
        fields = {f.name: getattr(teacher, f.name) for f in dataclasses.fields(cls)}
        fields[_DEPTH[cls]] = n_layers
    elif isinstance(teacher, BertConfig):
        fields = {
            "vocab_size": teacher.vocab_size,
            "max_position_embeddings": teacher.max_position_embeddings,
            "n_layers": n_layers,
            "n_heads": teacher.num_attention_heads,
            "dim": teacher.hidden_size,
            "hidden_dim": teacher.intermediate_size,
            "dropout": teacher.hidden_dropout_prob,
            "attention_dropout": teacher.attention_probs_dropout_prob,
            "activation": teacher.hidden_act,
            "initializer_range": teacher.initializer_range,
            "pad_token_id": teacher.pad_token_id,
        }
    else:
        fields = {f.name: getattr(teacher, f.name) for f in dataclasses.fields(DistilBertConfig)}
        fields["n_layers"] = n_layers
    # sinusoidal_pos_embds is allowed: as in the reference (2019 transformers created the fixed
    # table, then extract_distilbert.py's weights overwrote it), the teacher's positions are copied
    # and then frozen.
    shaped = _SHAPED[cls]
    for key, value in (overrides or {}).items():
        if key not in {f.name for f in dataclasses.fields(cls)}:
            raise UserError(f"student config field {key!r} is not a {cls.__name__} field; remove it")
        if key in shaped and value != fields.get(key, getattr(cls, key, None)):
            raise UserError(
                f"student config field {key!r} changes a tensor shape, which a student initialised "
                f"from teacher layers cannot do; remove it or use student.init=random"
            )
        fields[key] = value
    return cls(**fields)


def check_layers(layers: Sequence[int], teacher_layers: int) -> tuple[int, ...]:
    """Validates a layer list against the teacher's depth; returns it as a tuple."""
    layers = tuple(int(i) for i in layers)
    if not layers:
        raise UserError("the student needs at least one teacher layer; pass e.g. --layers 0,2,4,7,9,11")
    bad = [i for i in layers if not 0 <= i < teacher_layers]
    if bad:
        raise UserError(
            f"teacher layer(s) {bad} do not exist: the teacher has {teacher_layers} layers "
            f"(0..{teacher_layers - 1}); fix the layer list"
        )
    return layers


def student_from_teacher(
    teacher_cfg: ModelConfig,
    teacher_params: dict,
    layers: Sequence[int] = PAPER_LAYERS,
    *,
    vocab_transform: bool = True,
    fold_token_types: bool = True,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, dict, list[str]]:
    """Builds the student's config and params from the teacher's.

    teacher_params: unboxed param tree of a BertForMaskedLM or DistilBertForMaskedLM
      (``encoder/layers/*`` arrays are [L, ...]); the ``mlm_head`` subtree may be absent
      (a ``BertModel`` checkpoint), then the student's head is random.
    layers: teacher layer indices, in order; the student has ``len(layers)`` layers.
    vocab_transform: copy the MLM head's transform, its dense layer and its LayerNorm (the reference's
      ``--vocab_transform``); otherwise both keep transformers' fresh init (a random dense layer, a
      unit LayerNorm), as the reference leaves them. The head's output bias is always copied.
    fold_token_types: add ``token_type_embeddings[0]`` to the position embeddings (see module doc).
    seed: numpy seed for the pieces that are not copied (transformers' init: N(0, initializer_range)
      kernels, zero biases, unit LayerNorm scales).
    Returns (student config, student params as float32 numpy arrays, notes): notes lists what was
    not copied, for the caller to print.
    """
    layers = check_layers(layers, teacher_cfg.layers)
    cfg = student_config_from_teacher(teacher_cfg, len(layers), overrides)
    rand = np.random.default_rng(seed)
    notes: list[str] = []
    t = teacher_params

    def f32(tree):
        return jax.tree.map(lambda a: np.array(a, dtype=np.float32), tree)

    def random_dense(d_in: int, d_out: int) -> dict:
        kernel = rand.normal(0.0, cfg.initializer_range, (d_in, d_out)).astype(np.float32)
        return {"kernel": kernel, "bias": np.zeros((d_out,), np.float32)}

    position = f32(t["embeddings"]["position_embeddings"]["embedding"])
    token_types = t["embeddings"].get("token_type_embeddings")
    keep_types = bool(cfg.token_types)  # RoBERTa students keep their one token type
    if token_types is not None and not keep_types:
        if fold_token_types:
            position = position + f32(token_types["embedding"])[0][None, :]
            notes.append("token_type_embeddings[0] folded into the position embeddings")
        else:
            notes.append("token_type_embeddings dropped")
    embeddings = {
        "word_embeddings": {"embedding": f32(t["embeddings"]["word_embeddings"]["embedding"])},
        "position_embeddings": {"embedding": position},
    }
    if keep_types:
        embeddings["token_type_embeddings"] = f32(token_types)
    if "LayerNorm" in t["embeddings"]:  # not in GPT-2
        embeddings["LayerNorm"] = f32(t["embeddings"]["LayerNorm"])
    index = np.asarray(layers)
    encoder = {"layers": jax.tree.map(lambda a: np.take(f32(a), index, axis=0), t["encoder"]["layers"])}
    if "final_layer_norm" in t["encoder"]:  # GPT-2's ln_f
        encoder["final_layer_norm"] = f32(t["encoder"]["final_layer_norm"])
    if cfg.causal:  # GPT-2: the LM head is the tied projection, nothing else to copy
        return cfg, {"embeddings": embeddings, "encoder": encoder}, notes

    head = t.get("mlm_head")
    d = cfg.hidden
    fresh_norm = {"scale": np.ones((d,), np.float32), "bias": np.zeros((d,), np.float32)}
    if head is None:
        notes.append("the teacher has no MLM head: the student's head is randomly initialised")
        mlm_head = {
            "transform": random_dense(d, d),
            "transform_norm": fresh_norm,
            "bias": np.zeros((cfg.vocab_size,), np.float32),
        }
    else:
        # The reference's extract_distilbert.py / extract.py copy the transform's dense layer and its
        # LayerNorm together, under --vocab_transform only; the projection's bias always.
        mlm_head = {
            "transform": f32(head["transform"]) if vocab_transform else random_dense(d, d),
            "transform_norm": f32(head["transform_norm"]) if vocab_transform else fresh_norm,
            "bias": f32(head["bias"]),
        }
        if not vocab_transform:
            notes.append("vocab transform (dense and LayerNorm) freshly initialised (vocab_transform=False)")
    if cfg.sinusoidal:
        notes.append("position embeddings copied from the teacher and frozen (sinusoidal_pos_embds)")
    if teacher_cfg.ln_eps != cfg.ln_eps:
        notes.append(f"LayerNorm eps {teacher_cfg.ln_eps} -> {cfg.ln_eps} (DistilBERT's fixed value)")
    return cfg, {"embeddings": embeddings, "encoder": encoder, "mlm_head": mlm_head}, notes


def trained_params(loaded: LoadedModel) -> dict:
    """A loaded model's params without the placeholder MLM head that ``load_model`` gives
    encoder-only checkpoints (``BertModel``): what may be copied into a student."""
    if loaded.has_mlm_head:
        return loaded.params
    return {k: v for k, v in loaded.params.items() if k != "mlm_head"}


def resolve_teacher(cfg: Any, manifest: dict) -> LoadedModel | None:
    """The run's teacher (``cfg.teacher.model``), or None for MLM-only runs; checked against the
    data's vocabulary and tokenizer."""
    if cfg.teacher.model is None:
        return None
    teacher = load_model_arg(cfg.teacher.model, what="teacher directory")
    manifest_lib.check_model_vocab(manifest, teacher, what=f"the teacher {cfg.teacher.model}")
    if not teacher.has_mlm_head and cfg.loss.alpha_ce > 0:
        print(
            f"warning: the teacher {cfg.teacher.model} has no MLM head (encoder-only checkpoint); its "
            "logits are meaningless, so L_ce teaches noise: set loss.alpha_ce=0",
            file=sys.stderr,
        )
    return teacher


def resolve_extra_teachers(cfg: Any, manifest: dict) -> list[LoadedModel]:
    """The run config's ``teachers:`` list, loaded, in order; each checked against the data's
    tokenizer (a larger, padded vocabulary passes here: the step refuses it in a logit term)."""
    out = []
    for extra in cfg.teachers:
        loaded = load_model_arg(extra.model, what=f"teacher {extra.name} directory")
        manifest_lib.check_model_vocab(manifest, loaded, what=f"the teacher {extra.name} ({extra.model})",
                                       at_least=True)
        logit_terms = [t.kind for t in cfg.terms if t.on_logits and extra.name in t.teacher]
        if logit_terms and not loaded.has_mlm_head:
            raise UserError(f"the teacher {extra.name} ({extra.model}) has no MLM head but term {logit_terms[0]} reads "
                            "its logits; use a checkpoint with its MLM head or only hidden/attention terms for it")
        out.append(loaded)
    return out


def student_shape(cfg: Any, teacher: ModelConfig | None, vocab_size: int, pad_id: int) -> ModelConfig:
    """The student's model config from a run config (no weights needed).

    student.init: "teacher" -> the teacher's shape with ``len(student.layers)`` layers; "random" ->
    ``student.config`` (vocab and pad id default to the data's tokenizer); otherwise the shape of the
    model at that path / hub id.
    """
    s = cfg.student
    if s.init == "teacher":
        if teacher is None:
            raise UserError("student.init=teacher needs a teacher (teacher.model); set student.init=random for "
                            "MLM-only training")
        layers = check_layers(s.layers, teacher.layers)
        return student_config_from_teacher(teacher, len(layers), s.config)
    if s.init == "random":
        fields = {"vocab_size": vocab_size, "pad_token_id": pad_id, **s.config}
        try:
            return config_from_hf_dict({"model_type": s.model_type, **fields}, "student.config")
        except ConfigError as err:
            raise UserError(str(err)) from None
    return load_model_arg(s.init).config


def resolve_student(
    cfg: Any, teacher: LoadedModel | None, manifest: dict
) -> tuple[ModelConfig, Callable[[], tuple[dict, str]] | None]:
    """The student's model config and a function giving its initial params and where they come
    from (None: random init). The params are only built when called: a resumed run never needs them.
    """
    s = cfg.student
    tok = manifest["tokenizer"]
    if s.init not in ("teacher", "random"):
        loaded = load_model_arg(s.init)
        return loaded.config, lambda: (loaded.params, f"the model {s.init}")
    model_cfg = student_shape(cfg, teacher.config if teacher else None, int(tok["vocab_size"]),
                              int(tok["special_ids"]["pad"]))
    if s.init == "random":
        return model_cfg, None

    def from_teacher() -> tuple[dict, str]:
        layers = check_layers(s.layers, teacher.config.layers)
        _, params, notes = student_from_teacher(
            teacher.config, trained_params(teacher), layers, vocab_transform=s.vocab_transform,
            fold_token_types=s.fold_token_types, seed=cfg.train.seed, overrides=s.config)
        return params, f"teacher layers {list(layers)}" + "".join(f"; {n}" for n in notes)

    return model_cfg, from_teacher
