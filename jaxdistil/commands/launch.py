"""``jaxdistil launch --num-processes N [--devices-per-process K] -- COMMAND ...``: a local multi-process job."""

from __future__ import annotations

import argparse

from jaxdistil.commands import COMMANDS
from jaxdistil.launcher import launch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-processes", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--devices-per-process", type=int, default=1,
                        help="CPU devices each process sees (XLA host platform device count; default 1)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="coordinator address (default 127.0.0.1)")
    parser.add_argument("--grace-period", type=float, default=10.0,
                        help="after a process failed: seconds between SIGTERM and SIGKILL for the others "
                             "(default 10)")
    parser.add_argument("--save-timeout", type=float, default=120.0,
                        help="after Ctrl-C / SIGTERM to the launcher: seconds the processes get to save "
                             "a checkpoint and exit before SIGKILL; a second Ctrl-C kills at once "
                             "(default 120)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: a jaxdistil command (train ...), a .py script or a program")


def run(args: argparse.Namespace) -> int:
    return launch(args.command, args.num_processes, args.devices_per_process, port=args.port, host=args.host,
                  grace_period=args.grace_period, save_timeout=args.save_timeout, commands=COMMANDS)
