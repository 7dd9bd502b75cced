"""``jaxdistil glue --model M [--tasks ...] [--compare TEACHER] [--output DIR]``: the paper's GLUE table."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxdistil.finetune.glue import glue, markdown_table
from jaxdistil.finetune.tasks import GLUE

DEFAULT_CONFIG = "finetune/glue"  # configs/finetune/glue.yaml, shipped with the package


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model to score (a distilled student)")
    parser.add_argument("--tasks", default=",".join(GLUE),
                        help="comma list of tasks (default: the 9 GLUE tasks; offline: builtin:pydocs-topics)")
    parser.add_argument("--compare", default=None, help="a teacher: its row, and the student's retention")
    parser.add_argument("--output", default="glue-out", help="directory for the runs, glue.json and glue.md")
    parser.add_argument("--config", default=None,
                        help="fine-tuning config YAML (default: configs/finetune/glue.yaml, run_glue's recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="fine-tuning config overrides")


def run(args: argparse.Namespace) -> int:
    config = args.config or DEFAULT_CONFIG
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report = glue(args.model, tasks, args.output, args.compare, config, args.overrides)
    print(markdown_table(report), end="")
    print(f"wrote {Path(args.output) / 'glue.json'}, {Path(args.output) / 'glue.md'}")
    return 0
