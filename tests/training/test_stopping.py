"""SIGTERM / Ctrl-C: the flag the loop checks after each step; a second Ctrl-C stops at once; the
old handlers come back."""

from __future__ import annotations

import os
import signal

import pytest

from jaxdistil.training.stopping import StopSignal


def test_sigterm_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        assert not stop.check(0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.check(1) and stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_interrupts():
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
