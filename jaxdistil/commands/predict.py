"""``jaxdistil predict --model FINETUNED "text" ["text pair"] [--json]``: label and score of a text."""

from __future__ import annotations

import argparse
import json

from jaxdistil.errors import UserError
from jaxdistil.finetune.predict import predict
from jaxdistil.hf.load import load_model_arg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a fine-tuned classifier: a finetune run dir, a Flax or HF *ForSequenceClassification dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step of a run (default: latest)")
    parser.add_argument("--json", action="store_true", help="print the prediction as JSON")
    parser.add_argument("text", nargs="+", help="the text, and optionally its pair (two texts: one pair)")


def run(args: argparse.Namespace) -> int:
    if len(args.text) > 2:
        raise UserError(f"{len(args.text)} texts given; give one text or one pair (two texts), each in quotes")
    text = args.text[0] if len(args.text) == 1 else tuple(args.text)
    result = predict(load_model_arg(args.model, step=args.step, what="classifier directory"), [text])[0]
    if args.json:
        print(json.dumps(result))
    elif "value" in result:
        print(f"{result['value']:.4f}")
    else:
        print(f"{result['label']}  {result['score']:.4f}")
    return 0
