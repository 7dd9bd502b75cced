"""``jaxdistil train --config configs/NAME.yaml [key=value ...]``: distil (or MLM-pretrain) a model."""

from __future__ import annotations

import argparse

from jaxdistil.distill.config import load_run_config
from jaxdistil.train import train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="run config YAML (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted paths, e.g. train.steps=100 optim.learning_rate=1e-4")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over the run dir's lock when it was left by a process on another host")


def run(args: argparse.Namespace) -> int:
    result = train(load_run_config(args.config, args.overrides), force_unlock=args.force_unlock)
    if result.interrupted is not None:
        return 128 + int(result.interrupted)
    return 0
