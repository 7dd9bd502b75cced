"""``jaxdistil fill-mask --model DIR "Paris is the [MASK] of France." [--top-k 5] [--step N] [--json]``."""

from __future__ import annotations

import argparse
import json

from jaxdistil.fill_mask import fill_mask, load_tokenizer
from jaxdistil.hf.load import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="run directory, Flax model directory, HF directory or hub id")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    parser.add_argument("--top-k", type=int, default=5, help="number of predictions per mask")
    parser.add_argument("--json", action="store_true", help="print the predictions as JSON")
    parser.add_argument("text", nargs="+",
                        help='text with mask tokens, e.g. "Paris is the [MASK] of France."')


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, step=args.step)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, args.model)
    results = fill_mask(loaded, tokenizer, args.text, args.top_k)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
        return 0
    for text, per_mask in zip(args.text, results):
        print(text)
        for m, preds in enumerate(per_mask):
            if len(per_mask) > 1:
                print(f"  mask {m + 1}:")
            # decode() drops special tokens (""): show those by their vocabulary entry instead.
            shown = [p["token_str"] or tokenizer.convert_ids_to_tokens(p["token"]) for p in preds]
            width = max(len(t) for t in shown)
            for rank, (token, p) in enumerate(zip(shown, preds), start=1):
                print(f"  {rank}. {token:<{width}}  {p['score']:.4f}")
    return 0
