"""``jaxdistil demo [--output DIR] [--ablation] [--objectives] [--cache K,...]``: what distillation buys, end to end on the built-in corpus."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxdistil.demo import FINETUNE_EPOCHS, OBJECTIVES, SEEDS, TEACHER, DemoOptions, demo, format_report, publish
from jaxdistil.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-out", help="directory for data, runs, export and report")
    parser.add_argument("--ablation", action="store_true",
                        help="add the paper's random-init row: students distilled from a random init")
    parser.add_argument("--objectives", action="store_true",
                        help="add rows for other objectives (TinyBERT, MiniLM, MiniLMv2, the triple loss with L_mlm) "
                             "on the same init, budget, data and masks")
    parser.add_argument("--cache", metavar="K[,K...]", default="",
                        help="add rows distilled from teacher caches of the top K logits (e.g. 8,32,128): "
                             "the distilled recipe with no teacher in the step; the report gives each cache's "
                             "size and the time it saves per run")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)),
                        help="student seeds, comma-separated (at least 2 for a seed spread; default %(default)s)")
    parser.add_argument("--steps", type=int, default=None, help="override the students' updates (configs/demo.yaml)")
    parser.add_argument("--finetune-epochs", type=float, default=FINETUNE_EPOCHS,
                        help="passes over the downstream task in each fine-tuning (default %(default)s)")
    parser.add_argument("--teacher", default=str(TEACHER), help="the teacher (default: the shipped one)")
    parser.add_argument("--no-export", action="store_true", help="skip the Hugging Face export")
    parser.add_argument("--publish", metavar="DIR", default=None,
                        help="also copy the report and the files it is built from to DIR (e.g. docs/demo), "
                             "with paths relative to the demo directory")


def run(args: argparse.Namespace) -> int:
    try:
        seeds = tuple(int(s) for s in args.seeds.split(",") if s.strip())
    except ValueError:
        raise UserError(f"--seeds {args.seeds!r} is not a comma-separated list of integers, e.g. 56,57") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: give one or more distinct seeds, e.g. 56,57")
    try:
        cache = tuple(int(k) for k in args.cache.split(",") if k.strip())
    except ValueError:
        raise UserError(f"--cache {args.cache!r} is not a comma-separated list of top-k sizes, e.g. 8,32,128") from None
    report = demo(DemoOptions(output=args.output, teacher=args.teacher, seeds=seeds, steps=args.steps,
                              finetune_epochs=args.finetune_epochs, ablation=args.ablation,
                              export=not args.no_export, objectives=tuple(OBJECTIVES) if args.objectives else (), cache=cache))
    print("\n== report (" + str(Path(args.output).absolute() / "report.json") + ", report.png)")
    print(format_report(report))
    if args.publish:
        written = publish(args.output, args.publish)
        print(f"published {len(written)} files to {args.publish}")
    sys.stdout.flush()
    return 0
