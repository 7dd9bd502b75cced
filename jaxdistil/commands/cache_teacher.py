"""``jaxdistil cache-teacher --config RUN.yaml --output CACHE [--top-k K] [--steps N] [key=value ...]``:
run a run config's teacher over the batches and masks that run will see and store its outputs
(``jaxdistil.cache_teacher``); ``train ... teacher.cache=CACHE`` then reads them instead of running it."""

from __future__ import annotations

import argparse

from jaxdistil.cache_teacher import cache_teacher
from jaxdistil.distill.config import load_run_config
from jaxdistil.distill.teacher_cache import STORE_DTYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="the run config YAML the students will train with")
    parser.add_argument("--output", required=True, help="the cache directory (new, or a cache of this run to finish)")
    parser.add_argument("--top-k", type=int, default=32,
                        help="teacher logits kept per position (default 32; 0 = all: the online run's exact targets)")
    parser.add_argument("--steps", type=int, default=None, help="updates to cover (default: the run's)")
    parser.add_argument("--dtype", choices=STORE_DTYPES, default="bfloat16", help="storage of logits and hidden states")
    parser.add_argument("--chunk-steps", type=int, default=64, help="updates per file (the unit of resuming)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="the same overrides as train")


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, args.overrides)
    result = cache_teacher(cfg, args.output, top_k=args.top_k, steps=args.steps, dtype=args.dtype,
                           chunk_steps=args.chunk_steps, progress=not args.no_progress)
    print(f"{result.path}: {result.steps} updates (computed now: {result.computed}), top {result.top_k} logits, "
          f"{result.bytes / 2**20:.1f} MiB, {result.bytes_per_token:.0f} bytes per token, {result.seconds:.1f} s")
    return 0
