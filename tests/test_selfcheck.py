"""`jaxdistil selfcheck`: passes on the real models, fails (exit 1) on a parity failure."""

from __future__ import annotations

import pytest

from jaxdistil import cli, selfcheck

pytest.importorskip("torch", reason="selfcheck compares against transformers' PyTorch models")


@pytest.mark.slow
def test_selfcheck_passes(capsys):
    assert cli.main(["selfcheck", "--skip-pretrained"]) == 0
    out = capsys.readouterr().out
    assert "selfcheck passed" in out
    assert out.count("ok  ") == len(selfcheck.SMALL_CONFIGS)


def test_selfcheck_fails_on_a_parity_failure(monkeypatch, capsys):
    monkeypatch.setattr(selfcheck, "check_random_models",
                        lambda workdir: [("broken", {"logits": 3e-3, "hidden_states": 1e-6})])
    assert cli.main(["selfcheck", "--skip-pretrained"]) == 1
    out = capsys.readouterr().out
    assert "FAIL broken" in out and "selfcheck FAILED" in out


def test_selfcheck_without_torch_says_so(monkeypatch, capsys):
    from jaxdistil.hf import verify

    monkeypatch.setattr(verify, "torch_available", lambda: False)
    assert cli.main(["selfcheck"]) == 0
    assert "torch is not installed" in capsys.readouterr().out
