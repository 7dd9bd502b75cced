"""``jaxdistil evaluate --model RUN_DIR|FLAX_DIR|HF_DIR|HUB_ID --data DATA_DIR``: held-out MLM scores."""

from __future__ import annotations

import argparse
import json

from jaxdistil.distill.evaluation import evaluate_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="run dir, Flax model dir, Hugging Face dir or hub id")
    parser.add_argument("--data", required=True, help="prepared data directory (jaxdistil prepare)")
    parser.add_argument("--split", default="validation", help="split to score (default: the held-out one)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=None, help="truncate sequences (default: the data's)")
    parser.add_argument("--max-batches", type=int, default=0, help="stop after N batches (0 = all)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--step", type=int, default=None, help="checkpoint step of a run dir (default: latest)"
    )
    parser.add_argument("--mask-only", action="store_true",
                        help="replace every chosen position by [MASK] (no kept / random tokens) and report "
                             "the most-frequent-token baseline too")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    out = evaluate_model(
        args.model,
        args.data,
        batch_size=args.batch_size,
        max_len=args.max_len,
        max_batches=args.max_batches,
        dtype=args.dtype,
        split=args.split,
        step=args.step,
        mask_only=args.mask_only,
    )
    if args.json:
        print(json.dumps(out))
    else:
        step = f" (step {out['step']})" if out["step"] is not None else ""
        print(
            f"{out['model']}{step}: {out['params'] / 1e6:.2f}M params, {args.split} split, "
            f"{int(out['masked_tokens']):,} masked of {int(out['tokens']):,} tokens"
        )
        print(f"  mlm loss {out['loss']:.4f}  perplexity {out['perplexity']:.2f}", end="")
        print(f"  accuracy {out['accuracy']:.4f}", end="")
        if "baseline_accuracy" in out:
            print(f"  (most frequent token: {out['baseline_accuracy']:.4f})", end="")
        print()
    return 0
