"""The loop and its hooks, with a plain-Python step (no compile): the order of the calls, when the
log, evaluation and checkpoint hooks fire, SIGTERM (save, then stop), a resumed loop, data that
runs out."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from jaxdistil.training import loop
from jaxdistil.training.hooks import Checkpoint, Evaluate, Hook, Log, due


class Recorder(Hook):
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def at_start(self, lp):
        self.calls.append((self.name, "start", lp.step))

    def after_step(self, lp):
        self.calls.append((self.name, "step", lp.step))

    def at_end(self, lp):
        self.calls.append((self.name, "end", lp.step))

    def close(self):
        self.calls.append((self.name, "close", None))


class FakeLog:
    """A TrainLog stand-in: records adds, flushes and clock restarts."""

    def __init__(self):
        self.events = []

    def add(self, metrics, host_batch):
        self.events.append(("add", int(metrics["n"])))

    def flush(self, step):
        self.events.append(("flush", step))

    def restart_clock(self):
        self.events.append(("clock",))

    def close(self):
        self.events.append(("close",))


class FakeWriter:
    def __init__(self):
        self.lines = []

    def write(self, step, kind, values):
        self.lines.append((step, kind, dict(values)))


class FakeCheckpointer:
    def __init__(self):
        self.saves = []

    def save(self, state, data_state, metric=None):
        if self.saves and self.saves[-1][0] == state["step"]:
            return False
        self.saves.append((state["step"], data_state, metric))
        return True

    def close(self):
        self.saves.append(("closed",))


def step_fn(state, batch):
    new = {"step": state["step"] + 1}
    return new, {"n": np.float32(new["step"])}


def host_batches(n=100):
    return iter([{"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32)}] * n)


def test_hooks_run_in_order_every_step_and_at_the_end():
    calls = []
    result = loop.run(step_fn, {"step": 0}, host_batches(), lambda b: b, start_step=0, total_steps=3,
                      hooks=[Recorder("a", calls), Recorder("b", calls)], say=lambda *a: None)
    assert result.step == 3 and result.state == {"step": 3} and result.interrupted is None and not result.ran_out
    assert calls == [("a", "start", 0), ("b", "start", 0), ("a", "step", 1), ("b", "step", 1), ("a", "step", 2),
                     ("b", "step", 2), ("a", "step", 3), ("b", "step", 3), ("a", "end", 3), ("b", "end", 3),
                     ("a", "close", None), ("b", "close", None)]


def test_log_evaluate_checkpoint_schedule():
    log, writer, ckpt = FakeLog(), FakeWriter(), FakeCheckpointer()
    evaluations = []

    def evaluator(state):
        evaluations.append(state["step"])
        return {"score": float(state["step"])}

    hooks = [Log(log, every=2), Evaluate(evaluator, 3, writer, at_start=True),
             Checkpoint(ckpt, every=4, data_state=lambda: "iter", metric="score", save_on_eval=True)]
    loop.run(step_fn, {"step": 0}, host_batches(), lambda b: b, start_step=0, total_steps=7, hooks=hooks,
             say=lambda *a: None)
    assert evaluations == [0, 3, 6, 7]  # at start, every 3, at the end
    assert [line[0] for line in writer.lines] == [0, 3, 6, 7] and writer.lines[1][2] == {"score": 3.0}
    # The log is flushed every 2 steps, before each evaluation (its clock restarted after) and at the end.
    flushes = [e[1] for e in log.events if e[0] == "flush"]
    assert flushes == [0, 2, 3, 4, 6, 6, 7, 7, 7]  # (a flush with nothing pending writes nothing)
    assert log.events.count(("clock",)) == 4 and log.events[-1] == ("close",)
    # Saved every 4, after each evaluation (with its score) and at the end, never twice per step.
    assert ckpt.saves[:-1] == [(3, "iter", 3.0), (4, "iter", None), (6, "iter", 6.0), (7, "iter", 7.0)]
    assert ckpt.saves[-1] == ("closed",)


def test_resumed_loop_skips_the_start_evaluation_and_continues():
    writer, evaluated = FakeWriter(), []
    hooks = [Evaluate(lambda s: evaluated.append(s["step"]) or {"x": 1.0}, 0, writer, at_start=True)]
    result = loop.run(step_fn, {"step": 5}, host_batches(), lambda b: b, start_step=5, total_steps=7, hooks=hooks,
                      resumed=True, say=lambda *a: None)
    assert result.step == 7 and evaluated == [7]


def test_sigterm_saves_then_stops():
    ckpt, messages = FakeCheckpointer(), []

    def step_then_signal(state, batch):
        new, m = step_fn(state, batch)
        if new["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return new, m

    result = loop.run(step_then_signal, {"step": 0}, host_batches(), lambda b: b, start_step=0, total_steps=10,
                      hooks=[Checkpoint(ckpt, every=0, data_state=lambda: None)], say=messages.append)
    assert result.step == 3 and result.interrupted == signal.SIGTERM
    assert ckpt.saves[0][0] == 3 and len(ckpt.saves) == 2  # one save at the stop, then closed
    assert "SIGTERM received: saved a checkpoint at step 3" in messages[-1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is restored


def test_data_that_runs_out_ends_the_loop():
    messages = []
    result = loop.run(step_fn, {"step": 0}, host_batches(2), lambda b: b, start_step=0, total_steps=5, hooks=[],
                      say=messages.append, ran_out_hint=" (loader.num_epochs=1)")
    assert result.step == 2 and result.ran_out
    assert messages == ["the training data ran out after 2 steps (loader.num_epochs=1)"]


def test_hooks_are_closed_when_the_step_raises():
    calls = []

    def broken(state, batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        loop.run(broken, {"step": 0}, host_batches(), lambda b: b, start_step=0, total_steps=3,
                 hooks=[Recorder("a", calls)], say=lambda *a: None)
    assert calls[-1] == ("a", "close", None)


def test_due():
    lp = loop.Loop(step=4, total_steps=10, state=None)
    assert due(4, 2, lp) and not due(4, 3, lp) and not due(4, 0, lp)
    lp.step = 10
    assert due(10, 0, lp) and due(10, 3, lp)
