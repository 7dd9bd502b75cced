"""The project's rule for bad input, as one check: a command exits 2 with one ``error: ...`` line."""

from __future__ import annotations

from jaxdistil import cli


def one_line_error(capsys, argv: list[str]) -> str:
    """Runs ``jaxdistil argv``; asserts exit status 2 and exactly one stderr line ``error: ...``; returns it."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]
