"""Every ``jaxdistil ...`` command quoted in README.md (fenced bash blocks) and in the header comments
of the shipped configs parses with the real command-line parser; ``train`` / ``shard-study`` /
``finetune`` / ``glue`` also load the config they name with their overrides, ``prepare`` reads its
``--source``, and a ``demo-out/...`` path names something ``jaxdistil demo`` writes. Nothing runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from jaxdistil import cli
from jaxdistil.commands import COMMANDS

REPO = Path(__file__).resolve().parents[1]


def _commands_in(lines: list[str]) -> list[str]:
    """Shell lines (continuations joined) -> the ``jaxdistil ...`` commands among them, with
    comments stripped and ``&&`` / ``;`` chains split."""
    joined, buf = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        joined.append(buf + line)
        buf = ""
    out = []
    for line in joined:
        for part in re.split(r"&&|;", line):
            words = shlex.split(part, comments=True)
            if words and Path(words[0]).name == "jaxdistil":
                out.append(shlex.join(words[1:]))
    return out


def quoted_commands() -> list[tuple[str, str]]:
    """(where, the command's argv as a shell string) for README.md and configs/**/*.yaml."""
    found = []
    block: list[str] | None = None
    for line in (REPO / "README.md").read_text().splitlines():
        if block is None and line.strip().startswith("```bash"):
            block = []
        elif block is not None and line.strip().startswith("```"):
            found += [("README.md", c) for c in _commands_in(block)]
            block = None
        elif block is not None:
            block.append(line)
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        shell, more = [], False  # a header's command lines (prose is not shell) and their continuations
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            text = line.lstrip("#").strip()
            if more or text.startswith("jaxdistil "):
                shell.append(text)
            more = (more or text.startswith("jaxdistil ")) and text.endswith("\\")
        found += [(str(path.relative_to(REPO)), c) for c in _commands_in(shell)]
    return found


COMMANDS_QUOTED = quoted_commands()


def test_the_extraction_sees_the_commands():
    where = {w for w, _ in COMMANDS_QUOTED}
    assert "README.md" in where and "configs/distilroberta-base.yaml" in where and "configs/tiny.yaml" in where
    assert len(COMMANDS_QUOTED) >= 20
    names = {shlex.split(c)[0] for _, c in COMMANDS_QUOTED}
    assert {"prepare", "train", "export", "finetune", "predict", "launch", "shard-study"} <= names


def _optional_brackets(words: list[str]) -> list[str]:
    """``[--dtype bf16] [--force]`` (the README's optional arguments) -> the arguments themselves."""
    out = []
    for word in words:
        if word.startswith("[-") and word.endswith("]"):
            word = word[1:-1]  # [--force]
        while word.startswith("[") and word.count("[") > word.count("]"):
            word = word[1:]
        while word.endswith("]") and word.count("]") > word.count("["):
            word = word[:-1]
        if word:
            out.append(word)
    return out  # brackets inside a value (terms=[{kind: kl}]) are balanced and stay


def _demo_writes() -> set[str]:
    """What ``jaxdistil demo --output DIR`` writes directly under DIR: the ``out / "NAME"`` of demo.py."""
    return set(re.findall(r'\bout / "([^"/]+)"', (REPO / "jaxdistil" / "demo.py").read_text()))


def check(argv: list[str]) -> None:
    name = argv[0]
    assert name in COMMANDS, f"unknown command {name!r}"
    _, parser = cli.command_parser(name)
    try:
        args = cli.parse_command(parser, argv[1:])
    except SystemExit as err:
        pytest.fail(f"`jaxdistil {shlex.join(argv)}` does not parse (exit {err.code})")
    for word in argv:
        value = word.split("=", 1)[-1]
        if value.startswith("demo-out/"):
            assert value.split("/")[1] in _demo_writes(), f"{value}: `jaxdistil demo` writes no such path"
    if name in ("train", "cache-teacher"):
        from jaxdistil.distill.config import load_run_config

        load_run_config(args.config, args.overrides)
    elif name == "shard-study":
        from jaxdistil.commands.shard_study import split_items
        from jaxdistil.distill.config import load_run_config
        from jaxdistil.training.sharding import MeshConfig, make_rules

        meshes, overrides, rules = split_items(list(args.items) + list(args.meshes))
        for mesh in meshes:
            MeshConfig.parse(mesh).resolve(args.host_devices or 8, mesh)
        make_rules([r.removeprefix("rules.") for r in rules])
        load_run_config(args.config, overrides)
    elif name in ("finetune", "glue"):
        from jaxdistil.commands.glue import DEFAULT_CONFIG
        from jaxdistil.finetune.config import load_finetune_config

        config = args.config or (DEFAULT_CONFIG if name == "glue" else None)
        load_finetune_config(config, [*args.overrides, f"model={args.model}"])
    elif name == "prepare":
        from jaxdistil.data.corpus import parse_source

        parse_source(args.source)
    elif name == "launch":
        command = args.command[1:] if args.command[:1] == ["--"] else args.command
        check(command)


@pytest.mark.parametrize("where,command", COMMANDS_QUOTED, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS_QUOTED])
def test_quoted_command_parses_and_its_config_loads(where, command, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands name configs/... from the repository's root
    check(_optional_brackets(shlex.split(command)))


def test_a_rotten_command_fails(monkeypatch):
    """What the checks catch: an unknown option, a wrong config key, a missing config file, an unknown
    source kind, a demo path the demo does not write."""
    from jaxdistil.errors import UserError

    monkeypatch.chdir(REPO)
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check(["export", "--runs", "x", "--output", "y"])
    with pytest.raises(UserError, match="unknown config key"):
        check(["train", "--config", "configs/tiny.yaml", "train.stepz=3"])
    with pytest.raises(UserError):
        check(["train", "--config", "configs/no-such.yaml"])
    with pytest.raises(UserError, match="unknown source kind"):
        check(["prepare", "--source", "files:owt/*.txt", "--tokenizer", "gpt2", "--output", "d"])
    with pytest.raises(AssertionError, match="writes no such path"):
        check(["train", "--config", "configs/tiny.yaml", "teacher.model=demo-out/teacher"])
    with pytest.raises(UserError):
        check(["launch", "--num-processes", "2", "--", "train", "--config", "configs/tiny.yaml", "nope.x=1"])
