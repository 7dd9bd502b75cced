"""``jaxdistil`` command line: argument parsing only; every command is a library module.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``; modules are
imported only when their command runs, so ``jaxdistil --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jaxdistil.errors import UserError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "selfcheck": ("jaxdistil.selfcheck", "check the Flax models against transformers' PyTorch models"),
    "prepare": ("jaxdistil.data.prepare", "tokenize a corpus into ArrayRecord shards"),
    "train": ("jaxdistil.train", "train (distil or MLM-pretrain) from a YAML config"),
    "init-student": ("jaxdistil.init_student", "initialise a DistilBERT student from BERT teacher layers"),
    "evaluate": ("jaxdistil.evaluate", "held-out MLM loss, perplexity and accuracy of a model"),
    "export": ("jaxdistil.hf.commands", "export a run to a Hugging Face model directory"),
    "import": ("jaxdistil.hf.commands", "import a Hugging Face model into an orbax checkpoint"),
    "fill-mask": ("jaxdistil.fill_mask", "top-k predictions for [MASK] tokens"),
    "demo": ("jaxdistil.demo", "the built-in end-to-end demo: tokenizer, teacher, student, report"),
    "launch": ("jaxdistil.launch", "start N local processes for a multi-process run"),
    "shard-study": ("jaxdistil.shard_study", "compare mesh strategies for the distillation step"),
}


def _load(name: str):
    module_name = COMMANDS[name][0]
    module = importlib.import_module(module_name)
    # A module serving several commands exposes add_arguments_<cmd> / run_<cmd>.
    suffix = "_" + name.replace("-", "_")
    add = getattr(module, "add_arguments" + suffix, None) or module.add_arguments
    run = getattr(module, "run" + suffix, None) or module.run
    return add, run


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="jaxdistil", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    add, run = _load(name)
    cmd_parser = argparse.ArgumentParser(prog=f"jaxdistil {name}", description=COMMANDS[name][1])
    add(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    try:
        return int(run(args) or 0)
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
