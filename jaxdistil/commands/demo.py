"""``jaxdistil demo [--output DIR]``: the whole method end to end on the built-in corpus."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jaxdistil.demo import demo, format_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="demo-out", help="directory for data, runs, export and report")
    parser.add_argument("--teacher-steps", type=int, default=None, help="override the teacher's updates")
    parser.add_argument("--student-steps", type=int, default=None, help="override the student's updates")
    parser.add_argument("--no-export", action="store_true", help="skip the Hugging Face export")


def run(args: argparse.Namespace) -> int:
    report = demo(
        args.output,
        teacher_steps=args.teacher_steps,
        student_steps=args.student_steps,
        export=not args.no_export,
    )
    print("\n== report (" + str(Path(report["output"]) / "report.json") + ", report.png)")
    print(format_report(report))
    sys.stdout.flush()
    return 0
