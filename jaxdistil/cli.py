"""``jaxdistil`` command line: dispatch to the command modules of ``jaxdistil.commands``.

A command's module is imported only when that command runs, so ``jaxdistil --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from jaxdistil.commands import COMMANDS
from jaxdistil.errors import UserError


def command_parser(name: str) -> tuple[ModuleType, argparse.ArgumentParser]:
    """The module of command ``name`` and its argument parser."""
    module_name, help_text = COMMANDS[name]
    # Imported here, not at the top: each command pulls in JAX and its own libraries.
    command = importlib.import_module(f"jaxdistil.commands.{module_name}")
    parser = argparse.ArgumentParser(prog=f"jaxdistil {name}", description=help_text)
    command.add_arguments(parser)
    return command, parser


def parse_command(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """A command's arguments: options and key=value overrides in any order."""
    try:
        return parser.parse_intermixed_args(argv)
    except TypeError:  # a command whose last argument takes the rest (launch -- ...)
        return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jaxdistil", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    try:
        command, cmd_parser = command_parser(argv[0])
        return int(command.run(parse_command(cmd_parser, argv[1:])) or 0)
    except UserError as err:
        # One line, whatever a library put in the message.
        message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
