#!/usr/bin/env python
"""Convert weights between jaxdistil (Flax) and Hugging Face (PyTorch) model directories.

  python tools/convert_weights.py to-hf   --run RUN_DIR [--step N] --output HF_DIR [--dtype bf16] [--force]
  python tools/convert_weights.py to-hf   --model FLAX_DIR --output HF_DIR
  python tools/convert_weights.py to-flax --model HF_DIR_OR_HUB_ID --output FLAX_DIR [--force]

A thin wrapper: the same library code as ``jaxdistil export`` / ``jaxdistil import``
(``jaxdistil.commands.export`` / ``.import_model``); exports are verified against transformers when torch is installed.
"""

from __future__ import annotations

import argparse
import sys

from jaxdistil.commands import export, import_model
from jaxdistil.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    export.add_arguments(sub.add_parser("to-hf", help="Flax run/model directory -> Hugging Face directory"))
    import_model.add_arguments(
        sub.add_parser("to-flax", help="Hugging Face directory or hub id -> Flax model directory"))
    args = parser.parse_args(argv)
    try:
        return export.run(args) if args.direction == "to-hf" else import_model.run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
