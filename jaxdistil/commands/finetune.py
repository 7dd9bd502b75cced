"""``jaxdistil finetune --model M --task TASK [--config configs/finetune/NAME.yaml] [key=value ...]``."""

from __future__ import annotations

import argparse

from jaxdistil.finetune.config import load_finetune_config
from jaxdistil.finetune.run import finetune, format_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="encoder to fine-tune: run dir, Flax / HF dir or hub id")
    parser.add_argument("--task", required=True,
                        help="a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli), tfds:NAME, "
                             "a .csv/.tsv/.jsonl file, or builtin:pydocs-topics (offline)")
    parser.add_argument("--config", default=None, help="fine-tuning config YAML (default: run_glue's recipe)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. run_dir=runs/sst2 train.epochs=2 optim.learning_rate=3e-5")
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over the run dir's lock when it was left by a process on another host")


def run(args: argparse.Namespace) -> int:
    cfg = load_finetune_config(args.config, [*args.overrides, f"model={args.model}", f"task.name={args.task}"])
    result = finetune(cfg, force_unlock=args.force_unlock)
    print(format_result(result))
    return 128 + int(result.interrupted) if result.interrupted is not None else 0
