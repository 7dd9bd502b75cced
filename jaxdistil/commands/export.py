"""``jaxdistil export``: a run or a model directory as a verified Hugging Face directory.

  jaxdistil export --run RUN_DIR [--step N] --output HF_DIR [--dtype fp32|bf16|fp16] [--force]
  jaxdistil export --model FLAX_OR_HF_DIR --output HF_DIR ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxdistil.errors import UserError
from jaxdistil.hf import files
from jaxdistil.hf.export import TOLERANCE, export_model
from jaxdistil.hf.load import is_run_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="jaxdistil run directory (its student is exported)")
    src.add_argument("--model", help="Flax model directory, HF directory or hub id (re-export)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of the run (default: latest)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to write")
    parser.add_argument("--dtype", choices=sorted(files.DTYPES), default="fp32",
                        help="dtype of the stored tensors")
    parser.add_argument("--force", action="store_true", help="replace OUTPUT if it exists and is not empty")
    parser.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the check against transformers' PyTorch model "
                             "(it runs when torch is installed)")


def run(args: argparse.Namespace) -> int:
    source = args.run or args.model
    if args.run and not Path(args.run).expanduser().exists():
        raise UserError(f"run directory {args.run} does not exist; pass the run_dir of a `jaxdistil train` or "
                        "`jaxdistil finetune` run (or a model directory or hub id with --model)")
    if args.run and Path(args.run).is_dir() and not is_run_dir(args.run):
        raise UserError(f"{args.run} is not a jaxdistil run directory (no config.yaml, checkpoints/ or "
                        "student/config.json); pass model directories with --model")
    report = export_model(source, args.output, step=args.step, dtype=args.dtype, force=args.force,
                          max_shard_size=args.max_shard_size, verify=not args.no_verify)
    print(f"exported {source} -> {report.output} ({args.dtype}): {', '.join(report.files)}")
    if report.verified:
        print(f"verified with transformers: max |logits diff| = {report.max_abs_diff:.3g} "
              f"(limit {TOLERANCE:g})")
    else:
        print(report.note)
    return 0
