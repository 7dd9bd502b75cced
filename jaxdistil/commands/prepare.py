"""``jaxdistil prepare --source SOURCE --tokenizer TOKENIZER --output DIR``: tokenize a corpus."""

from __future__ import annotations

import argparse

from jaxdistil.data import corpus
from jaxdistil.data.prepare import PrepareConfig, prepare


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--source",
        nargs="+",
        default=[corpus.BUILTIN_PYTHON_DOCS],
        help="builtin:python-docs (default, offline), tfds:NAME[/CONFIG], or text files/globs",
    )
    parser.add_argument(
        "--tokenizer",
        required=True,
        help="Hugging Face tokenizer directory or hub id (the teacher's), or train:N to train "
        "a WordPiece tokenizer of N tokens on the corpus",
    )
    parser.add_argument("--output", required=True, help="directory to write (must be empty unless --force)")
    parser.add_argument(
        "--max-len", type=int, default=512, help="longest sequence; longer documents are chunked"
    )
    parser.add_argument("--force", action="store_true", help="replace prepared data already in --output")
    parser.add_argument(
        "--holdout",
        type=float,
        default=0.05,
        help="fraction of documents held out for evaluation, chosen by text hash",
    )
    parser.add_argument(
        "--doc-mode",
        choices=("line", "blank"),
        default="line",
        help="local files: one document per line, or per blank-line-separated block",
    )
    parser.add_argument("--text-field", default="text", help="tfds: the feature holding the text")
    parser.add_argument("--tfds-split", default="train", help="tfds: split (slicing allowed: train[:10%%])")
    parser.add_argument(
        "--tfds-eval-split", default=None, help="tfds: held-out split (default: --holdout of --tfds-split)"
    )
    parser.add_argument("--tfds-data-dir", default=None, help="tfds: data_dir where datasets live")
    parser.add_argument("--no-download", action="store_true", help="tfds: never download or prepare")
    parser.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: CPU count)")
    parser.add_argument("--cased", action="store_true", help="train:N: keep case (default lower-cases)")
    parser.add_argument(
        "--tokenizer-sample", type=int, default=1_000_000, help="train:N: documents to train the tokenizer on"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    options = corpus.SourceOptions(
        holdout=args.holdout, doc_mode=args.doc_mode, text_field=args.text_field, tfds_split=args.tfds_split,
        tfds_eval_split=args.tfds_eval_split, tfds_data_dir=args.tfds_data_dir, download=not args.no_download)
    cfg = PrepareConfig(args.source, args.tokenizer, args.output, max_len=args.max_len, force=args.force,
                        workers=args.workers, lowercase=not args.cased, tokenizer_sample=args.tokenizer_sample,
                        options=options)
    prepare(cfg, progress=not args.quiet)
    return 0
