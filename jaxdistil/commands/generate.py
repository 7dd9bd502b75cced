"""``jaxdistil generate --model DIR "prompt" [--tokens 20] [--temperature 0] [--seed 0] [--json]``."""

from __future__ import annotations

import argparse
import json

from jaxdistil.fill_mask import load_tokenizer
from jaxdistil.generate import generate
from jaxdistil.hf.load import load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="run directory, Flax model directory, HF directory or hub id of a causal LM (GPT-2)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    parser.add_argument("--tokens", type=int, default=20, help="new tokens per prompt (at most: a continuation stops at the end-of-text token)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; > 0: sample at this temperature")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--json", action="store_true", help="print the continuations as JSON")
    parser.add_argument("prompt", nargs="+", help="text to continue")


def run(args: argparse.Namespace) -> int:
    loaded = load_model(args.model, step=args.step)
    tokenizer = load_tokenizer(loaded.tokenizer_dir, args.model)
    results = generate(loaded, tokenizer, args.prompt, args.tokens, args.temperature, args.seed)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1))
    else:
        for r in results:
            print(r["text"])
    return 0
