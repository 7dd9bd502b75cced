"""The loop's hooks: log, evaluate, checkpoint. Each is small, and knows only its own job.

  Log(train_log, every)                        one metrics line every N steps and at the end
  Evaluate(evaluator, every, writer, ...)      an Evaluator every N steps (at step 0 too, and at the end)
  Checkpoint(checkpointer, every, data_state)  a save every N steps, at the end, on SIGTERM, and after
                                               each evaluation when the best checkpoints are kept

An ``Evaluator`` is anything that scores the current state: ``evaluator(state) -> {name: value}``.
The held-out masked-LM scores of a distillation run (``jaxdistil.distill.evaluation``) and the GLUE
metrics of a fine-tuning run (``jaxdistil.finetune.evaluation``) are evaluators of this one kind; the
Evaluate hook writes their values as the run's "eval" line and keeps them for the Checkpoint hook,
which ranks checkpoints by one of them (``metric``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from jaxdistil.training.checkpoint import RunCheckpointer
from jaxdistil.training.loop import Loop
from jaxdistil.training.metrics import MetricsWriter, TrainLog


class Evaluator(Protocol):
    """Scores a train state: ``evaluator(state) -> {name: value}`` (floats)."""

    def __call__(self, state: Any) -> dict[str, float]: ...


class Hook:
    """No-op defaults for the loop's hook protocol (``jaxdistil.training.loop.Hook``)."""

    def at_start(self, loop: Loop) -> None:
        pass

    def after_step(self, loop: Loop) -> None:
        pass

    def at_end(self, loop: Loop) -> None:
        pass

    def close(self) -> None:
        pass


def due(step: int, every: int, loop: Loop) -> bool:
    """Every ``every`` steps (0 = never) and at the run's last step."""
    return loop.done or (every > 0 and step % every == 0)


class Log(Hook):
    """The train metrics: added every step, one line every ``every`` steps and at the end."""

    def __init__(self, train_log: TrainLog, every: int):
        self.train_log, self.every = train_log, every

    def after_step(self, loop: Loop) -> None:
        self.train_log.add(loop.metrics, loop.host_batch)
        if due(loop.step, self.every, loop):
            self.train_log.flush(loop.step)

    def at_end(self, loop: Loop) -> None:
        self.train_log.flush(loop.step)

    def flush(self, step: int) -> None:
        self.train_log.flush(step)

    def restart_clock(self) -> None:
        self.train_log.restart_clock()

    def close(self) -> None:
        self.train_log.close()


class Evaluate(Hook):
    """Runs ``evaluator`` every ``every`` steps and at the end (``every`` 0: at the end only).

    at_start: also before the first step of a fresh run (where the student starts, e.g. right after
    copying teacher layers). The values go to ``writer`` as an "eval" line, to ``report`` (a line of
    text for the console) and to ``loop.evaluation`` for the other hooks. Throughput is not charged
    for the evaluation: the log is flushed before it and its clock restarted after.
    """

    def __init__(self, evaluator: Evaluator, every: int, writer: MetricsWriter,
                 report: Callable[[int, Mapping[str, float]], None] | None = None, at_start: bool = False):
        self.evaluator, self.every, self.writer = evaluator, every, writer
        self.report, self.at_start_too = report, at_start

    def evaluate(self, loop: Loop) -> None:
        log = loop.find(Log)
        if log is not None:
            log.flush(loop.step)
        values = self.evaluator(loop.state)
        self.writer.write(loop.step, "eval", values)
        loop.evaluation, loop.evaluated_at = dict(values), loop.step
        if self.report is not None:
            self.report(loop.step, values)
        if log is not None:
            log.restart_clock()

    def at_start(self, loop: Loop) -> None:
        if self.at_start_too and not loop.resumed:
            self.evaluate(loop)

    def after_step(self, loop: Loop) -> None:
        if due(loop.step, self.every, loop):
            self.evaluate(loop)


class Checkpoint(Hook):
    """Saves the state and the data iterator's state (``data_state()``) every ``every`` steps, at
    the end and when the loop is stopping (``every`` 0: at the end only).

    metric: the evaluation value recorded with a save made right after an evaluation (the
    checkpointer ranks checkpoints by it to keep the best ones); save_on_eval: also save after
    every evaluation (needed to keep the best ones).
    """

    def __init__(self, checkpointer: RunCheckpointer, every: int, data_state: Callable[[], Any],
                 metric: str | None = None, save_on_eval: bool = False):
        self.ckpt, self.every, self.data_state = checkpointer, every, data_state
        self.metric, self.save_on_eval = metric, save_on_eval

    def after_step(self, loop: Loop) -> None:
        if (due(loop.step, self.every, loop) or loop.stopping is not None
                or (self.save_on_eval and loop.evaluated_now())):
            self.save(loop)

    def save(self, loop: Loop) -> None:
        value = loop.evaluation.get(self.metric) if self.metric and loop.evaluated_now() else None
        self.ckpt.save(loop.state, self.data_state(), metric=value)

    def at_end(self, loop: Loop) -> None:
        if loop.stopping is not None:
            self.save(loop)  # a no-op when this step is saved already

    def close(self) -> None:
        self.ckpt.close()
