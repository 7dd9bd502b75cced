"""Initialise a DistilBERT student from a BERT teacher's layers (the reference's ``extract_distilbert.py``).

The student keeps the teacher's word and position embeddings, its embedding LayerNorm, a chosen
subset of its encoder layers and its MLM head. Because both models share one parameter tree (see
``jaxdistil.models.layers``) with the layers stacked on a leading axis, "take layers 0, 2, 4, 7, 9,
11" is one ``take`` on every ``encoder/layers`` array; the BERT -> DistilBERT renaming
(query -> q_lin, intermediate.dense -> ffn.lin1, ...) only exists at the Hugging Face boundary.

Token types: DistilBERT has none. The reference simply drops BERT's token-type table, so a student
built that way sees every embedding shifted by ``token_type_embeddings[0]`` compared with its
teacher. With ``fold_token_types`` (default) we add that row to every position embedding instead:
on token-type-0 input (all the distillation data) the student's embeddings then equal the
teacher's exactly, and a student made of *all* the teacher's layers is the teacher.

Command: ``jaxdistil init-student --teacher DIR --layers 0,2,4,7,9,11 --output DIR``.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.models import BertConfig, DistilBertConfig, ModelConfig

PAPER_LAYERS = (0, 2, 4, 7, 9, 11)


def student_config_from_teacher(
    teacher: ModelConfig, n_layers: int, overrides: dict[str, Any] | None = None
) -> DistilBertConfig:
    """The DistilBERT config with the teacher's shape and ``n_layers`` layers.

    ``overrides``: DistilBERT config.json fields to change (e.g. ``{"dropout": 0.0}``); fields
    that would change a tensor shape (dim, hidden_dim, n_heads, vocab_size, ...) are refused since
    the student's tensors are copied from the teacher.
    """
    if isinstance(teacher, BertConfig):
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
    shaped = {"vocab_size", "max_position_embeddings", "n_layers", "n_heads", "dim", "hidden_dim"}
    for key, value in (overrides or {}).items():
        if key not in {f.name for f in dataclasses.fields(DistilBertConfig)}:
            raise UserError(f"student config field {key!r} is not a DistilBertConfig field; remove it")
        if key in shaped and value != fields.get(key, getattr(DistilBertConfig, key, None)):
            raise UserError(
                f"student config field {key!r} changes a tensor shape, which a student initialised "
                f"from teacher layers cannot do; remove it or use student.init=random"
            )
        fields[key] = value
    return DistilBertConfig(**fields)


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
) -> tuple[DistilBertConfig, dict, list[str]]:
    """Builds the student's config and params from the teacher's.

    teacher_params: unboxed param tree of a BertForMaskedLM or DistilBertForMaskedLM
      (``encoder/layers/*`` arrays are [L, ...]); the ``mlm_head`` subtree may be absent
      (a ``BertModel`` checkpoint), then the student's head is random.
    layers: teacher layer indices, in order; the student has ``len(layers)`` layers.
    vocab_transform: copy the MLM head's transform dense (the reference's ``--vocab_transform``);
      otherwise it is drawn at random. The head's LayerNorm and output bias are always copied.
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
    if token_types is not None:
        if fold_token_types:
            position = position + f32(token_types["embedding"])[0][None, :]
            notes.append("token_type_embeddings[0] folded into the position embeddings")
        else:
            notes.append("token_type_embeddings dropped")
    embeddings = {
        "word_embeddings": {"embedding": f32(t["embeddings"]["word_embeddings"]["embedding"])},
        "position_embeddings": {"embedding": position},
        "LayerNorm": f32(t["embeddings"]["LayerNorm"]),
    }
    index = np.asarray(layers)
    encoder = {"layers": jax.tree.map(lambda a: np.take(f32(a), index, axis=0), t["encoder"]["layers"])}

    head = t.get("mlm_head")
    d = cfg.dim
    if head is None:
        notes.append("the teacher has no MLM head: the student's head is randomly initialised")
        mlm_head = {
            "transform": random_dense(d, d),
            "transform_norm": {"scale": np.ones((d,), np.float32), "bias": np.zeros((d,), np.float32)},
            "bias": np.zeros((cfg.vocab_size,), np.float32),
        }
    else:
        mlm_head = {
            "transform": f32(head["transform"]) if vocab_transform else random_dense(d, d),
            "transform_norm": f32(head["transform_norm"]),
            "bias": f32(head["bias"]),
        }
        if not vocab_transform:
            notes.append("vocab transform randomly initialised (vocab_transform=False)")
    if cfg.sinusoidal:
        notes.append("position embeddings copied from the teacher and frozen (sinusoidal_pos_embds)")
    if teacher_cfg.ln_eps != cfg.ln_eps:
        notes.append(f"LayerNorm eps {teacher_cfg.ln_eps} -> {cfg.ln_eps} (DistilBERT's fixed value)")
    return cfg, {"embeddings": embeddings, "encoder": encoder, "mlm_head": mlm_head}, notes


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,2,4"`` -> (0, 2, 4), with a one-line error for anything else."""
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise UserError(f"--layers {text!r} is not a comma-separated list of integers, e.g. 0,2,4,7,9,11")


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--teacher",
        required=True,
        help="teacher: Hugging Face dir, Flax model dir, jaxdistil run dir or hub id",
    )
    parser.add_argument(
        "--layers",
        default=",".join(map(str, PAPER_LAYERS)),
        help="teacher layers to keep, comma-separated (default: the paper's 0,2,4,7,9,11)",
    )
    parser.add_argument("--output", required=True, help="Flax model directory to write")
    parser.add_argument(
        "--no-vocab-transform",
        action="store_true",
        help="do not copy the MLM head's transform dense (random init instead)",
    )
    parser.add_argument(
        "--no-fold-token-types",
        action="store_true",
        help="drop token_type_embeddings as the reference does instead of folding row 0 "
        "into the position embeddings",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the parts not copied")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    from jaxdistil.hf import load_model, save_flax_model

    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"output directory {out} exists and is not empty; choose another or pass --force")
    teacher = load_teacher(args.teacher, load_model)
    # load_model gives head-less checkpoints (BertModel) a placeholder head: do not copy it.
    t_params = (
        teacher.params
        if teacher.has_mlm_head
        else {k: v for k, v in teacher.params.items() if k != "mlm_head"}
    )
    cfg, params, notes = student_from_teacher(
        teacher.config,
        t_params,
        parse_layers(args.layers),
        vocab_transform=not args.no_vocab_transform,
        fold_token_types=not args.no_fold_token_types,
        seed=args.seed,
    )
    # A head drawn at random (teacher without one) is not a trained MLM head: say so in the directory.
    save_flax_model(
        cfg,
        params,
        out,
        has_mlm_head=teacher.has_mlm_head,
        tokenizer_dir=teacher.tokenizer_dir,
        force=args.force,
        origin=f"init-student --teacher {args.teacher} --layers {args.layers}",
    )
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(
        f"student: {cfg.n_layers} layers from teacher layers {args.layers}, {n_params / 1e6:.1f}M params "
        f"-> {out}"
    )
    for note in notes:
        print(f"  note: {note}")
    return 0


def load_teacher(source: str, load_model) -> Any:
    """``load_model(source)`` with a one-line error for a local path that does not exist."""
    looks_local = source.startswith((".", "/", "~")) or Path(source).exists() or source.count("/") > 1
    if looks_local and not Path(source).expanduser().exists():
        raise UserError(f"teacher directory {source} does not exist; pass a model directory or a hub id")
    return load_model(str(Path(source).expanduser()) if looks_local else source)
