"""Run one command as N local processes of a jax.distributed job, on CPU devices (``jaxdistil launch``).

For testing multi-host code on one machine: ``jaxdistil launch --num-processes 2
--devices-per-process 4 -- train --config configs/tiny.yaml`` starts two ``jaxdistil train``
processes, each seeing 4 CPU devices (8 in the global mesh), joined through a coordinator on
127.0.0.1. Their output is streamed line by line with a ``[p0]``/``[p1]`` prefix. If one process
fails, the others are stopped (SIGTERM, then SIGKILL after ``--grace-period`` seconds) and the
launcher exits with the failing process's code. Ctrl-C / SIGTERM to the launcher is forwarded to
every process, which then save a checkpoint at one agreed step and exit (``jaxdistil train``);
those still running after ``--save-timeout`` seconds, or at a second Ctrl-C, are killed.

Each child gets (on top of the launcher's environment):
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
  JAX_PLATFORMS=cpu  XLA_FLAGS=... --xla_force_host_platform_device_count=K  PYTHONUNBUFFERED=1
which ``jaxdistil.distributed.initialize`` (``distributed.mode: auto``) picks up.

The command after ``--`` is a jaxdistil command (``train ...`` runs ``python -m jaxdistil.cli train
...``), a Python script (``script.py args`` runs with this interpreter) or any program.

Nothing here imports JAX: the launcher starts in a fraction of a second, and the environment
variable names below are the contract ``jaxdistil.distributed`` reads.
"""

from __future__ import annotations

import codecs
import ctypes
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import IO

from jaxdistil.errors import UserError

# How a process learns its place in a job (read by jaxdistil.distributed; JAX's own names).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_POLL_S = 0.05


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the coordinator binds it right after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def child_command(command: Sequence[str], commands: Collection[str] = ()) -> list[str]:
    """The argv for one process: the names in ``commands`` (jaxdistil's commands) and .py scripts
    run with this Python."""
    command = list(command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UserError("nothing to launch; put the command after --, e.g. "
                        "jaxdistil launch --num-processes 2 -- train --config configs/tiny.yaml")
    if command[0] in commands:
        return [sys.executable, "-m", "jaxdistil.cli", *command]
    if command[0].endswith(".py"):
        return [sys.executable, *command]
    return command


def child_env(base: Mapping[str, str], process_id: int, num_processes: int, devices_per_process: int,
              coordinator: str) -> dict[str, str]:
    """Environment of process ``process_id``: coordinator, rank, CPU platform with K host devices."""
    env = dict(base)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
    flags.append(f"{_DEVICE_FLAG}={devices_per_process}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env[ENV_COORDINATOR] = coordinator
    env[ENV_NUM_PROCESSES] = str(num_processes)
    env[ENV_PROCESS_ID] = str(process_id)
    env["PYTHONUNBUFFERED"] = "1"  # stream logs as they are written, not at exit
    return env


def _parent_death_signal():
    """A function for the child to run before exec (Linux): SIGKILL it when the launcher dies, so
    that even a SIGKILLed launcher leaves no process behind. libc is loaded here, in the parent:
    between fork and exec the child only makes the system call."""
    if sys.platform != "linux":
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


class _Pump(threading.Thread):
    """Copies one child pipe to ``out`` line by line with a prefix (``\\r`` ends a line too: tqdm)."""

    def __init__(self, pipe: IO[bytes], prefix: str, out: IO[str], lock: threading.Lock):
        super().__init__(daemon=True)
        self.pipe, self.prefix, self.out, self.lock = pipe, prefix, out, lock

    def _emit(self, text: str) -> None:
        with self.lock:
            try:
                self.out.write(self.prefix + text)
                self.out.flush()
            except (ValueError, OSError):  # our own stdout closed (e.g. piped into head)
                pass

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        fd = self.pipe.fileno()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += decoder.decode(chunk)
            start = 0
            for i, ch in enumerate(pending):
                if ch in "\n\r":
                    self._emit(pending[start:i + 1])
                    start = i + 1
            pending = pending[start:]
        pending += decoder.decode(b"", final=True)
        if pending:
            self._emit(pending + "\n")
        self.pipe.close()


@dataclasses.dataclass
class _Child:
    index: int
    proc: subprocess.Popen
    pumps: list[_Pump]


def _exit_code(rc: int) -> int:
    """A shell-style status: killed by signal s -> 128 + s."""
    return 128 - rc if rc < 0 else rc


def _signal_group(child: _Child, sig: int) -> None:
    if child.proc.poll() is not None:
        return
    try:
        os.killpg(child.proc.pid, sig)  # the child and anything it started (own session)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(children: list[_Child], sig: int, grace_period: float, log, abort=lambda: False) -> None:
    """Send ``sig`` to every running child, then SIGKILL those still running after ``grace_period``
    seconds (or as soon as ``abort()`` is true)."""
    for child in children:
        _signal_group(child, sig)
    deadline = time.monotonic() + grace_period
    while time.monotonic() < deadline and not abort() and any(c.proc.poll() is None for c in children):
        time.sleep(_POLL_S)
    for child in children:
        if child.proc.poll() is None:
            log(f"p{child.index} still running after {grace_period:g}s; killing it")
            _signal_group(child, signal.SIGKILL)
    for child in children:
        child.proc.wait()


def launch(command: Sequence[str], num_processes: int, devices_per_process: int = 1, port: int | None = None,
           host: str = "127.0.0.1", grace_period: float = 10.0, save_timeout: float = 120.0,
           env: Mapping[str, str] | None = None, commands: Collection[str] = (),
           stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> int:
    """Run ``command`` as ``num_processes`` processes of one jax.distributed job on this machine.

    Returns 0 when every process exits with 0; otherwise the exit code of the first process that
    failed (128 + signal for a killed one), after stopping the others; 128 + signal when the
    launcher itself was interrupted. ``commands``: the names that are jaxdistil commands.
    """
    if num_processes < 1:
        raise UserError(f"--num-processes={num_processes} must be at least 1")
    if devices_per_process < 1:
        raise UserError(f"--devices-per-process={devices_per_process} must be at least 1")
    if grace_period < 0 or save_timeout < 0:
        raise UserError(f"--grace-period={grace_period} and --save-timeout={save_timeout} "
                        "must be >= 0 seconds")
    argv = child_command(command, commands)
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    lock = threading.Lock()

    def log(message: str) -> None:
        with lock:
            stderr.write(f"[launch] {message}\n")
            stderr.flush()

    coordinator = f"{host}:{port or free_port(host)}"
    base = os.environ if env is None else env
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            received.append(signum)

        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, on_signal)

    children: list[_Child] = []
    try:
        log(f"{num_processes} processes x {devices_per_process} CPU devices, coordinator {coordinator}: "
            + " ".join(argv))
        die_with_launcher = _parent_death_signal()
        for i in range(num_processes):
            env_i = child_env(base, i, num_processes, devices_per_process, coordinator)
            proc = subprocess.Popen(argv, env=env_i,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True,
                                    preexec_fn=die_with_launcher)
            prefix = f"[p{i}] "
            pumps = [_Pump(proc.stdout, prefix, stdout, lock), _Pump(proc.stderr, prefix, stderr, lock)]
            for pump in pumps:
                pump.start()
            children.append(_Child(i, proc, pumps))
            log(f"p{i} pid {proc.pid}")

        failed: tuple[int, int] | None = None
        while not received:
            for child in children:
                rc = child.proc.poll()
                if rc not in (None, 0):
                    failed = (child.index, rc)
                    break
            if failed or all(c.proc.poll() is not None for c in children):
                break
            time.sleep(_POLL_S)

        if received:
            sig = received[0]
            log(f"got {signal.Signals(sig).name}; forwarding it to every process")
            # The processes save a checkpoint before exiting: wait longer, unless signalled again.
            _stop(children, sig, save_timeout, log, abort=lambda: len(received) > 1)
            log("exit codes: " + " ".join(f"p{c.index}={_exit_code(c.proc.returncode)}" for c in children))
            code = 128 + sig
        elif failed:
            index, rc = failed
            reason = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with code {rc}"
            log(f"p{index} {reason}; stopping the other processes")
            _stop(children, signal.SIGTERM, grace_period, log)
            code = _exit_code(rc)
        else:
            code = 0
        for child in children:
            for pump in child.pumps:
                pump.join(timeout=5.0)
        if code == 0:
            log("all processes finished")
        else:
            log(f"exit code {code}")
        return code
    finally:
        # Never leave a child behind (an exception in the launcher itself included).
        leftover = [c for c in children if c.proc.poll() is None]
        if leftover:
            _stop(leftover, signal.SIGKILL, 0.0, log)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
