"""The one training loop, with hooks: every run (distillation, fine-tuning, later objectives) is
``run(step, state, batches, hooks)`` and differs only in its step and its hooks.

  while step < total and no stop was asked:
      host batch = next(batches)              this process's rows of the global batch
      state, metrics = step(state, batch)     under jax.transfer_guard("disallow")
      every hook: after_step(loop)            log, evaluate, checkpoint... in the order given
  every hook: at_end(loop)                    final log line, final save

SIGTERM / Ctrl-C (``jaxdistil.training.stopping``) ends the loop after the current step; in a
multi-process run every process stops after the same step (``jaxdistil.distributed.agreed_stop``),
so that all of them take part in the final save. The hooks (``jaxdistil.training.hooks``) share the
``Loop``: the step number, the state, the last step's metrics and host batch, the last evaluation,
whether the loop is stopping.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import jax

from jaxdistil import distributed
from jaxdistil.training.stopping import StopSignal


class Hook(Protocol):
    """Something the loop calls after every step and once at the end (see the module doc)."""

    def at_start(self, loop: Loop) -> None: ...

    def after_step(self, loop: Loop) -> None: ...

    def at_end(self, loop: Loop) -> None: ...

    def close(self) -> None: ...


@dataclasses.dataclass
class Loop:
    """What the hooks see and share.

    step: updates done; state: the current TrainState; metrics / host_batch: the last step's
    (device metrics, host rows); evaluation: the last evaluation's values and its step;
    stopping: the signal that ends the loop after this step, or None; resumed: the run continued
    from a checkpoint.
    """

    step: int
    total_steps: int
    state: Any
    resumed: bool = False
    metrics: dict[str, Any] | None = None
    host_batch: dict[str, Any] | None = None
    evaluation: dict[str, float] = dataclasses.field(default_factory=dict)
    evaluated_at: int | None = None
    stopping: int | None = None
    hooks: Sequence[Hook] = ()

    @property
    def done(self) -> bool:
        """This step is the run's last."""
        return self.step >= self.total_steps

    def evaluated_now(self) -> bool:
        return self.evaluated_at == self.step

    def find(self, kind: type) -> Any:
        """The first hook of a type (e.g. the Log hook, to flush before an evaluation), or None."""
        return next((h for h in self.hooks if isinstance(h, kind)), None)


@dataclasses.dataclass
class LoopResult:
    step: int
    state: Any
    interrupted: int | None  # the signal that stopped the run, None when it finished
    evaluation: dict[str, float]
    ran_out: bool  # the batches ended before total_steps


def run(step: Callable[[Any, Any], tuple[Any, dict]], state: Any, batches: Iterator[dict],
        shard_batch: Callable[[dict], Any], *, start_step: int, total_steps: int, hooks: Sequence[Hook],
        resumed: bool = False, say: Callable[[str], None] = print, ran_out_hint: str = "") -> LoopResult:
    """Runs ``step`` from ``start_step`` to ``total_steps`` (see the module doc).

    step(state, device batch) -> (state, metrics): the jitted update (the state is donated);
    batches: host batches; shard_batch: places one on the mesh (explicitly: the transfer guard is
    on while the step runs); hooks: called in order; they are closed however the loop ends;
    ran_out_hint: added to the message when the batches end before ``total_steps``.
    """
    loop = Loop(start_step, total_steps, state, resumed=resumed, hooks=tuple(hooks))
    stop, ran_out = StopSignal(), False
    try:
        with stop:
            for hook in loop.hooks:
                hook.at_start(loop)
            while loop.step < total_steps and not stop.check(loop.step):
                try:
                    host_batch = next(batches)
                except StopIteration:
                    ran_out = True
                    say(f"the training data ran out after {loop.step} steps{ran_out_hint}")
                    break
                batch = shard_batch(host_batch)
                with jax.transfer_guard("disallow"):  # any implicit host<->device copy is a bug
                    loop.state, loop.metrics = step(loop.state, batch)
                loop.step += 1
                loop.host_batch = host_batch
                if distributed.agreed_stop(loop.step):  # multi-process: SIGTERM seen by any process
                    stop.signum = signal.SIGTERM
                loop.stopping = stop.signum
                for hook in loop.hooks:
                    hook.after_step(loop)
            loop.stopping = stop.signum
            for hook in loop.hooks:
                hook.at_end(loop)
            if stop.signum is not None:
                say(f"\n{signal.Signals(stop.signum).name} received: saved a checkpoint at step {loop.step}; "
                    "run the same command to resume")
    finally:
        for hook in loop.hooks:
            hook.close()
    return LoopResult(loop.step, loop.state, stop.signum, loop.evaluation, ran_out)
