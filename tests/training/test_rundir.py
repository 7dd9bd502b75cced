"""The run directory's lock (one process per run dir): refused while held, taken over when its holder
is gone, honoured from another host unless forced, released on exit. The multi-process job's lock is
in tests/test_distributed.py, a second ``train`` on a live run dir in tests/test_train.py."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from jaxdistil.errors import UserError
from jaxdistil.training import rundir


@pytest.mark.slow
def test_held_lock_refuses_a_second_holder(tmp_path):
    run = tmp_path / "run"
    with rundir.RunLock(run) as lock:
        holder = rundir.read_holder(run)
        assert holder == lock.holder and holder.pid == os.getpid()
        # Another process (a real one: flock is per open file) is refused in one line naming the holder.
        code = ("import sys; from jaxdistil.training import rundir; from jaxdistil.errors import UserError\n"
                "try:\n    rundir.RunLock(sys.argv[1]).acquire()\nexcept UserError as e:\n    print(e); sys.exit(2)")
        res = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 2
        assert f"is in use by pid {os.getpid()}" in res.stdout and "\n" not in res.stdout.strip()
    assert not (run / "lock.json").exists() and (run / ".lock").exists()


def test_stale_and_foreign_holders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = rundir.Holder(host=os.uname().nodename, pid=2**22 + 12345, process_start="1", started="then", command="x")
    (run / "lock.json").write_text(json.dumps(dataclasses.asdict(dead)))
    warnings = []
    with rundir.RunLock(run, log=warnings.append):
        pass
    assert "no longer running; taking the lock over" in warnings[0]
    foreign = dataclasses.replace(dead, host="elsewhere")
    (run / "lock.json").write_text(json.dumps(dataclasses.asdict(foreign)))
    with pytest.raises(UserError, match="another host, which cannot be checked from here; .*--force-unlock"):
        rundir.RunLock(run).acquire()
    with rundir.RunLock(run, force_unlock=True, log=warnings.append):
        assert "--force-unlock: taking over" in warnings[-1]


def test_unwritable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create the run dir lock"):
        rundir.RunLock(blocker / "run").acquire()
