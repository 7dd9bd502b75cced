"""The run directory's exclusive lock: one process (one job) writes ``RUN/`` at a time.

Every run directory (distillation: ``jaxdistil.distill.run_files``; fine-tuning: ``jaxdistil.finetune.run``)
holds ``RUN/checkpoints/<step>/`` (``jaxdistil.training.checkpoint``), ``RUN/metrics.jsonl`` and ``RUN/tb/``
(``jaxdistil.training.metrics``), and while a run uses it ``RUN/.lock`` and ``RUN/lock.json`` (below).

The lock: one process (one job) writes ``RUN/`` at a time.

Two ``jaxdistil train`` processes on one run directory (a job started twice, a cluster re-queue
while the old job still runs, a resume typed in another terminal) would both write checkpoints and
metrics, and which of them survives would be luck. So ``train`` and ``finetune`` take this lock
before they touch ``RUN/``:

  RUN/.lock       the lock itself: ``fcntl.flock`` held on it for the life of the run. The kernel
                  releases it when the holder exits, however it exits (SIGKILL, a crash), so a lock
                  left by a dead process is never mistaken for a live one. Never deleted: deleting a
                  flock file while another process waits on it would let two processes hold it.
  RUN/lock.json   who holds it: host, pid, the process's start time, when the run started and the
                  command line; written atomically (temporary file + rename), removed on release.

A second process on the same host finds ``.lock`` held and stops with a one-line error naming the
holder. A ``lock.json`` whose flock is free was left by a process that is gone: on the same host that
is checked (the pid no longer runs, or runs another program) and the lock is taken over with a
one-line warning. From another host (a shared filesystem, where flock may not reach across hosts)
nothing can be checked, so that lock is honoured unless the caller passes ``force_unlock``.

Multi-process runs hold one lock for the whole job: process 0 takes it after ``jax.distributed`` is
up, and the other processes wait for its outcome (``jaxdistil.distributed.share_from_main``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax

from jaxdistil import distributed
from jaxdistil.errors import UserError

LOCK_FILE = ".lock"
INFO_FILE = "lock.json"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot, /proc/PID/stat field 22), which
    tells a live holder from an unrelated process that reused its pid; None where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ")".
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclasses.dataclass(frozen=True)
class Holder:
    """What ``lock.json`` says about the process holding a run directory."""

    host: str
    pid: int
    process_start: str | None
    started: str  # ISO time the lock was taken
    command: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} (since {self.started}: {self.command})"

    def is_running_here(self) -> bool:
        """On this host: whether that very process still runs (same pid and start time)."""
        if not _pid_alive(self.pid):
            return False
        start = _process_start(self.pid)
        return start is None or self.process_start is None or start == self.process_start

    @classmethod
    def of_this_process(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            process_start=_process_start(os.getpid()),
            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            command=" ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300],
        )


def read_holder(run_dir: str | os.PathLike, retries: int = 20) -> Holder | None:
    """The holder recorded in ``RUN/lock.json``, or None when there is none (or it is unreadable)."""
    path = Path(run_dir) / INFO_FILE
    for attempt in range(retries):
        try:
            data = json.loads(path.read_text())
            return Holder(**{f.name: data.get(f.name) for f in dataclasses.fields(Holder)})
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            if attempt + 1 < retries:  # written by a rename, so a bad file is rare; read again
                time.sleep(0.05)
    return None


class RunLock:
    """The exclusive lock of ``run_dir`` (see the module doc). Use as a context manager, or call
    ``acquire()`` / ``release()``; ``acquire`` creates ``run_dir`` when it does not exist yet.

    force_unlock: take over a lock recorded by a process on another host (which cannot be checked).
    log: where the one-line take-over warnings go (stderr by default).
    """

    def __init__(self, run_dir: str | os.PathLike, force_unlock: bool = False, log: Any = None):
        self.run_dir = Path(run_dir)
        self.force_unlock = force_unlock
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.fd: int | None = None
        self.holder: Holder | None = None

    def acquire(self) -> RunLock:
        if self.fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot create the run dir lock {self.run_dir / LOCK_FILE} ({err.strerror}); "
                            "use a run_dir you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_holder(self.run_dir)
            who = holder.describe() if holder else "another process on this host"
            raise UserError(f"run dir {self.run_dir} is in use by {who}; wait for it to finish or stop it, "
                            "or give this run another run_dir") from None
        try:
            self._check_recorded_holder()
            self.holder = Holder.of_this_process()
            self._write_info(self.holder)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _check_recorded_holder(self) -> None:
        """The flock is ours; decide about a holder still recorded in lock.json."""
        old = read_holder(self.run_dir)
        if old is None:
            return
        if old.host == socket.gethostname():
            if old.pid != os.getpid() and old.is_running_here():
                # Alive but without the flock: e.g. a filesystem where flock does not work.
                raise UserError(f"run dir {self.run_dir} is in use by {old.describe()}; wait for it to "
                                "finish or stop it, or give this run another run_dir")
            self.log(f"warning: run dir {self.run_dir} was locked by {old.describe()}, which is no longer "
                     "running; taking the lock over")
            return
        if not self.force_unlock:
            raise UserError(f"run dir {self.run_dir} is locked by {old.describe()}, another host, which "
                            "cannot be checked from here; if that job is gone, pass --force-unlock")
        self.log(f"warning: --force-unlock: taking over the lock of run dir {self.run_dir} from {old.describe()}")

    def _write_info(self, holder: Holder) -> None:
        tmp = self.run_dir / f".{INFO_FILE}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(dataclasses.asdict(holder), indent=1) + "\n")
        os.replace(tmp, self.run_dir / INFO_FILE)

    def release(self) -> None:
        if self.fd is None:
            return
        current = read_holder(self.run_dir, retries=1)
        if current is not None and current == self.holder:
            try:
                (self.run_dir / INFO_FILE).unlink()
            except OSError:
                pass
        os.close(self.fd)  # releases the flock
        self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


@contextlib.contextmanager
def hold(run_dir: str | os.PathLike, force_unlock: bool = False, log: Any = None) -> Iterator[RunLock | None]:
    """Holds ``run_dir``'s lock for the whole job while the block runs.

    Call on every process, after ``jax.distributed`` is up: process 0 takes the lock and the others
    wait at a barrier for its outcome, so that either every process goes on or every one raises the
    same one-line ``UserError``. Yields the lock on process 0, None on the others.
    """
    lock, problem = None, ""
    if jax.process_index() == 0:
        try:
            lock = RunLock(run_dir, force_unlock, log).acquire()
        except UserError as err:
            problem = str(err)
    problem = distributed.share_from_main(f"run-lock:{Path(run_dir).absolute()}", problem)
    if problem:
        raise UserError(problem)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
