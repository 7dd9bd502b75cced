"""``jaxdistil init-student --teacher DIR --layers 0,2,4,7,9,11 --output DIR``: a student from teacher layers
(DistilBERT from BERT; RoBERTa and GPT-2 students of their teacher's architecture)."""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import numpy as np

from jaxdistil.errors import UserError
from jaxdistil.hf import save_flax_model
from jaxdistil.hf.load import load_model_arg
from jaxdistil.students import PAPER_LAYERS, student_from_teacher, trained_params


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,2,4"`` -> (0, 2, 4), with a one-line error for anything else."""
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x != "")
    except ValueError:
        raise UserError(f"--layers {text!r} is not a comma-separated list of integers, e.g. 0,2,4,7,9,11") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", required=True,
                        help="teacher: Hugging Face dir, Flax model dir, jaxdistil run dir or hub id")
    parser.add_argument("--layers", default=",".join(map(str, PAPER_LAYERS)),
                        help="teacher layers to keep, comma-separated (default: the paper's 0,2,4,7,9,11)")
    parser.add_argument("--output", required=True, help="Flax model directory to write")
    parser.add_argument("--no-vocab-transform", action="store_true",
                        help="do not copy the MLM head's transform (dense + LayerNorm: fresh init instead)")
    parser.add_argument("--no-fold-token-types", action="store_true",
                        help="drop token_type_embeddings as the reference does instead of folding row 0 "
                             "into the position embeddings")
    parser.add_argument("--seed", type=int, default=0, help="seed for the parts not copied")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def run(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UserError(f"output directory {out} exists and is not empty; choose another or pass --force")
    teacher = load_model_arg(args.teacher)
    cfg, params, notes = student_from_teacher(
        teacher.config, trained_params(teacher), parse_layers(args.layers),
        vocab_transform=not args.no_vocab_transform, fold_token_types=not args.no_fold_token_types,
        seed=args.seed)
    # A head drawn at random (teacher without one) is not a trained MLM head: say so in the directory.
    save_flax_model(cfg, params, out, has_mlm_head=teacher.has_mlm_head, tokenizer_dir=teacher.tokenizer_dir,
                    force=args.force, origin=f"init-student --teacher {args.teacher} --layers {args.layers}")
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    print(f"student: {type(cfg).__name__} of {cfg.layers} layers from teacher layers {args.layers}, {n_params / 1e6:.1f}M params "
          f"-> {out}")
    for note in notes:
        print(f"  note: {note}")
    return 0
