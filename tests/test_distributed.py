"""Multi-process runs: jaxdistil.distributed (joining, global batches, barriers) and ``jaxdistil launch``.

Every multi-process test runs real processes through the launcher on 127.0.0.1 with CPU devices
and gloo collectives; nothing is mocked except the environment given to ``plan``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from jaxdistil import distributed as dist
from jaxdistil import launcher as launch
from jaxdistil.commands import COMMANDS
from jaxdistil.data import global_batches as gb
from jaxdistil.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _launch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxdistil.cli", "launch", *args]


def _run_launch(args: list[str], timeout: float = 120, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run(_launch_cmd(*args), cwd=cwd, env=env, capture_output=True, timeout=timeout)
    # Decoded by hand: text=True would turn the "\r" of progress bars into newlines.
    return subprocess.CompletedProcess(res.args, res.returncode, res.stdout.decode(), res.stderr.decode())


def _script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return path


# --------------------------------------------------------------------------- plan (pure)


def test_plan_single_without_anything():
    p = dist.plan("auto", environ={})
    assert p.action == "single"
    assert dist.plan("none", environ={dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2",
                                      dist.ENV_PROCESS_ID: "1"}).action == "single"


def test_plan_explicit_from_env_and_config_wins():
    env = {dist.ENV_COORDINATOR: "10.0.0.1:1234", dist.ENV_NUM_PROCESSES: "4", dist.ENV_PROCESS_ID: "3"}
    p = dist.plan("auto", environ=env)
    assert (p.action, p.coordinator_address, p.num_processes, p.process_id) == (
        "explicit", "10.0.0.1:1234", 4, 3)
    p = dist.plan({"mode": "explicit", "process_id": 0, "coordinator_address": "h:9"}, environ=env)
    assert (p.action, p.coordinator_address, p.num_processes, p.process_id) == ("explicit", "h:9", 4, 0)
    # One process needs no coordinator.
    assert dist.plan(dist.DistributedConfig(num_processes=1, process_id=0, coordinator_address="h:1"),
                     environ={}).action == "single"


def test_plan_accepts_run_config_section_objects():
    class Section:  # the run config's own ``distributed`` dataclass has a subset of the fields
        mode = "explicit"
        coordinator_address = "h:5"
        num_processes = 2
        process_id = 1

    p = dist.plan(Section(), environ={})
    assert (p.action, p.num_processes, p.process_id, p.local_device_ids) == ("explicit", 2, 1, ())


@pytest.mark.parametrize(
    "cfg, env, match",
    [
        ("explicit", {}, "coordinator_address, num_processes, process_id not given"),
        ("auto", {dist.ENV_COORDINATOR: "h:1"}, "num_processes, process_id missing"),
        ("auto", {dist.ENV_COORDINATOR: "h:1", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "2"},
         r"process_id=2 must be in \[0, 2\)"),
        ("auto", {dist.ENV_COORDINATOR: "nohostport", dist.ENV_NUM_PROCESSES: "2", dist.ENV_PROCESS_ID: "0"},
         "HOST:PORT"),
        ("auto", {dist.ENV_NUM_PROCESSES: "two"}, "JAX_NUM_PROCESSES='two' is not an integer"),
        ("sometimes", {}, "must be one of auto, explicit, none"),
        ({"mode": "auto", "coordinator": "x"}, {}, "unknown key distributed.coordinator"),
    ],
)
def test_plan_errors_are_one_line(cfg, env, match):
    with pytest.raises(UserError, match=match) as info:
        dist.plan(cfg, environ=env)
    assert "\n" not in str(info.value)


def test_plan_detects_clusters_like_jax():
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-002]", "SLURM_NTASKS": "8",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}
    p = dist.plan("auto", environ=slurm)
    assert (p.action, p.cluster) == ("cluster", "SlurmCluster")
    # jax fills in what is missing; what we know is passed through.
    assert p.coordinator_address is None and p.process_id is None
    # One SLURM task: a plain single process that keeps every local GPU.
    assert dist.plan("auto", environ=dict(slurm, SLURM_NTASKS="1")).action == "single"
    # Partial explicit values plus a cluster: the cluster completes them.
    p = dist.plan("auto", environ=dict(slurm, JAX_COORDINATOR_ADDRESS="n1:4000"))
    assert (p.action, p.coordinator_address) == ("cluster", "n1:4000")
    ompi = {"OMPI_MCA_orte_hnp_uri": "1234.0;tcp://10.0.0.5:5000", "OMPI_COMM_WORLD_SIZE": "2"}
    assert dist.plan("auto", environ=ompi).cluster == "OmpiCluster"
    with pytest.raises(UserError, match="not given"):
        dist.plan("explicit", environ=slurm)


def test_detect_cluster_uses_jax_detectors_here():
    # This machine is no cluster: JAX's own detectors (read from os.environ) find nothing.
    if any(k.startswith(("SLURM_", "OMPI_")) for k in os.environ):
        pytest.skip("running inside a SLURM / Open MPI job")
    assert dist.detect_cluster() is None


# --------------------------------------------------------------------------- launcher pieces


def test_child_env_and_command():
    base = {"XLA_FLAGS": "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8", "KEEP": "1"}
    env = launch.child_env(base, 1, 3, 4, "127.0.0.1:5555")
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", "--xla_force_host_platform_device_count=4"]
    assert (env["JAX_COORDINATOR_ADDRESS"], env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"]) == (
        "127.0.0.1:5555", "3", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["KEEP"] == "1"
    assert launch.child_command(["--", "train", "--config", "c.yaml"], COMMANDS) == [
        sys.executable, "-m", "jaxdistil.cli", "train", "--config", "c.yaml"]
    assert launch.child_command(["x.py", "1"]) == [sys.executable, "x.py", "1"]
    assert launch.child_command(["echo", "hi"]) == ["echo", "hi"]
    with pytest.raises(UserError, match="nothing to launch"):
        launch.child_command(["--"])


def test_launch_prefixes_output_and_succeeds(tmp_path):
    child = _script(tmp_path, "child.py", """
        import os, sys
        rank = os.environ["JAX_PROCESS_ID"]
        print(f"out of {rank} n={os.environ['JAX_NUM_PROCESSES']} {os.environ['XLA_FLAGS']}")
        print(f"err of {rank}", file=sys.stderr)
        sys.stdout.write("progress 50%\\rprogress 100%")  # tqdm-style, no final newline
    """)
    res = _run_launch(["--num-processes", "3", "--devices-per-process", "2", "--", str(child)])
    assert res.returncode == 0, res.stderr
    for rank in range(3):
        assert f"[p{rank}] out of {rank} n=3 --xla_force_host_platform_device_count=2\n" in res.stdout
        assert f"[p{rank}] err of {rank}\n" in res.stderr
        pieces = re.findall(rf"\[p{rank}\] [^\r\n]*[\r\n]", res.stdout)  # "\r" ends a piece too
        assert pieces[-2:] == [f"[p{rank}] progress 50%\r", f"[p{rank}] progress 100%\n"]
    assert "all processes finished" in res.stderr


def test_launch_stops_everyone_when_one_fails(tmp_path):
    child = _script(tmp_path, "child.py", """
        import os, sys, time
        if os.environ["JAX_PROCESS_ID"] == "1":
            time.sleep(0.5)
            sys.exit(3)
        time.sleep(120)
    """)
    start = time.monotonic()
    res = _run_launch(["--num-processes", "3", "--grace-period", "5", "--", str(child)], timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 3
    assert "p1 exited with code 3; stopping the other processes" in res.stderr
    assert elapsed < 10, elapsed  # SIGTERM ends the sleepers at once


def test_launch_kills_processes_that_ignore_sigterm(tmp_path):
    child = _script(tmp_path, "child.py", """
        import os, signal, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        if os.environ["JAX_PROCESS_ID"] == "0":
            time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    start = time.monotonic()
    res = _run_launch(["--num-processes", "2", "--grace-period", "1", "--", str(child)], timeout=60)
    elapsed = time.monotonic() - start
    assert res.returncode == 128 + signal.SIGKILL
    assert "p0 was killed by SIGKILL" in res.stderr
    assert "p1 still running after 1s; killing it" in res.stderr
    assert elapsed < 8, elapsed


def test_launcher_forwards_its_sigterm(tmp_path):
    marker = tmp_path / "marks"
    marker.mkdir()
    child = _script(tmp_path, "child.py", f"""
        import os, signal, sys, time
        def bye(signum, frame):
            open(os.path.join({str(marker)!r}, os.environ["JAX_PROCESS_ID"]), "w").write(str(signum))
            sys.exit(0)
        signal.signal(signal.SIGTERM, bye)
        print("ready", flush=True)
        time.sleep(120)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_launch_cmd("--num-processes", "2", "--", str(child)), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += "ready" in line
        if seen == 2:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "got SIGTERM; forwarding it" in err
    assert sorted(p.name for p in marker.iterdir()) == ["0", "1"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in state  # a zombie has exited


@pytest.mark.skipif(sys.platform != "linux", reason="parent-death signal is Linux only")
def test_children_die_with_a_killed_launcher(tmp_path):
    child = _script(tmp_path, "child.py", """
        import time
        print("ready", flush=True)
        time.sleep(120)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(_launch_cmd("--num-processes", "2", "--", str(child)), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0
    for line in proc.stdout:
        seen += "ready" in line
        if seen == 2:
            break
    proc.kill()  # no chance to clean up: the children must go by themselves
    _, err = proc.communicate(timeout=30)
    pids = [int(p) for p in re.findall(r"\[launch\] p\d pid (\d+)", err)]
    assert len(pids) == 2
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)


def test_launch_bad_arguments():
    res = _run_launch(["--num-processes", "0", "--", "echo"])
    assert res.returncode == 2 and "error: --num-processes=0 must be at least 1" in res.stderr
    res = _run_launch(["--num-processes", "2"])
    assert res.returncode == 2 and "error: nothing to launch" in res.stderr


# --------------------------------------------------------------------------- jax.distributed over gloo

COLLECTIVES = """
    import sys
    import numpy as np
    from jaxdistil import distributed as dist
    from jaxdistil.data import global_batches as gb

    info = dist.initialize("auto")          # reads the launcher's JAX_* variables
    again = dist.initialize("auto")         # idempotent
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P

    assert info.action == "explicit" and again.action == "already", (info, again)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    rank, n = jax.process_index(), jax.process_count()
    print(f"rank={rank} of {n} devices={jax.device_count()} local={jax.local_device_count()} "
          f"main={dist.is_main_process()}", flush=True)

    # psum over every device of every process (gloo all-reduce across processes).
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, P()))
    local = {"x": np.arange(4, dtype=np.float32).reshape(4, 1) + 100 * rank}
    rows = gb.process_rows(NamedSharding(mesh, P("data")), 4 * n)
    g = gb.global_batch(local, NamedSharding(mesh, P("data")))
    print(f"rows={rows.start}:{rows.stop} shape={g['x'].shape} sum={float(dist.host_value(total(g['x'])))}",
          flush=True)

    # Process-local rows land where the sharding says: gather the whole array back everywhere.
    from jax.experimental import multihost_utils
    full = multihost_utils.process_allgather(g["x"], tiled=True)
    print("full=" + ",".join(str(int(v)) for v in np.asarray(full).ravel()), flush=True)
    dist.barrier("end")
    dist.barrier("end2")
"""


@pytest.mark.slow
def test_distributed_init_psum_over_gloo(tmp_path):
    child = _script(tmp_path, "collectives.py", COLLECTIVES)
    res = _run_launch(["--num-processes", "2", "--devices-per-process", "2", "--", str(child)], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    assert "[p0] rank=0 of 2 devices=4 local=2 main=True" in out
    assert "[p1] rank=1 of 2 devices=4 local=2 main=False" in out
    expected = float(sum(range(4)) + sum(v + 100 for v in range(4)))
    assert f"[p0] rows=0:4 shape=(8, 1) sum={expected}" in out
    assert f"[p1] rows=4:8 shape=(8, 1) sum={expected}" in out
    full = "full=0,1,2,3,100,101,102,103"
    assert f"[p0] {full}" in out and f"[p1] {full}" in out


RUN_LOCK = """
    import json, sys
    from pathlib import Path
    from jaxdistil import distributed as dist
    from jaxdistil.training import rundir
    from jaxdistil.errors import UserError
    info = dist.initialize("auto")
    try:
        with rundir.hold(Path(sys.argv[1])) as lock:
            holder = json.loads((Path(sys.argv[1]) / "lock.json").read_text())
            print(f"held by pid {holder['pid']}; mine={lock is not None}", flush=True)
            dist.barrier("inside")
    except UserError as err:
        print(f"refused: {err}", flush=True)
        sys.exit(2)
"""


@pytest.mark.slow
def test_a_multiprocess_job_holds_one_lock(tmp_path):
    """Process 0 takes the run dir's lock once the job is up, the others wait for its outcome:
    either every process goes on, or every one stops with the same one-line error."""
    from jaxdistil.training import rundir

    child = _script(tmp_path, "lock.py", RUN_LOCK)
    run = tmp_path / "run"
    res = _run_launch(["--num-processes", "2", "--", str(child), str(run)], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    p0 = [line for line in res.stdout.splitlines() if line.startswith("[p0] held by pid")]
    p1 = [line for line in res.stdout.splitlines() if line.startswith("[p1] held by pid")]
    assert p0 and p1 and p0[0].endswith("mine=True") and p1[0].endswith("mine=False")
    assert p0[0].split("pid ")[1].split(";")[0] == p1[0].split("pid ")[1].split(";")[0]  # one holder
    assert not (run / "lock.json").exists()  # released
    with rundir.RunLock(run):  # held by this test process: the whole job is refused
        res = _run_launch(["--num-processes", "2", "--", str(child), str(run)], timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    refused = [line for line in res.stdout.splitlines() if "refused: run dir" in line]
    assert len(refused) == 2 and f"pid {os.getpid()}" in refused[0]
    assert refused[0].split("refused: ")[1] == refused[1].split("refused: ")[1]


@pytest.mark.slow
def test_initialize_after_jax_use_is_an_error(tmp_path):
    child = _script(tmp_path, "late.py", """
        import jax
        jax.devices()
        from jaxdistil import distributed as dist
        from jaxdistil.data import global_batches as gb
        dist.initialize("auto")
    """)
    res = _run_launch(["--num-processes", "2", "--", str(child)], timeout=60)
    assert res.returncode != 0
    assert "JAX was used before jaxdistil.distributed.initialize()" in res.stderr


def test_data_shards_and_stop_defaults():
    assert dist.num_data_shards(None) == 1  # one per process
    assert dist.num_data_shards(dist.DistributedConfig(data_shards=4)) == 4
    assert dist.num_data_shards({"data_shards": 2}) == 2
    assert dist.agreed_stop(7) is False  # single process: signals are handled directly
    with pytest.raises(UserError, match="data_shards must be >= 0"):
        dist.DistributedConfig(data_shards=-1)


def test_sharded_batches_in_one_process():
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    class Shard:
        def __init__(self, index, count):
            self.index, self.pos = index, 0

        def __next__(self):
            if self.pos >= 2 + self.index:  # shard i has 2 + i batches
                raise StopIteration
            self.pos += 1
            t = 4 * (1 + self.index)
            return {"input_ids": np.full((2, t), 10 + self.index, np.int32),
                    "attention_mask": np.ones((2, t), np.int32)}

        def get_state(self):
            return {"pos": self.pos}

        def set_state(self, state):
            self.pos = state["pos"]

    with pytest.raises(UserError, match="4 rows does not split evenly"):
        gb.ShardedBatches(Shard, 2, 2, NamedSharding(jax.make_mesh((8,), ("data",)), P("data")))
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4])
    batches = gb.ShardedBatches(Shard, 2, 2, NamedSharding(mesh, P("data")), {"input_ids": 0})
    assert batches.shards == (0, 1)
    first = next(batches)
    state = batches.get_state()
    assert state == {"num_shards": 2, "shards": {"0": {"pos": 1}, "1": {"pos": 1}}}
    # Shard 0's rows are padded to shard 1's length 8.
    np.testing.assert_array_equal(first["attention_mask"].sum(axis=1), [4, 4, 8, 8])
    np.testing.assert_array_equal(first["input_ids"][:2, 4:], 0)
    rest = list(batches)
    assert len(rest) == 2  # shard 1 has 3 batches; shard 0 gives padding rows in the last
    np.testing.assert_array_equal(rest[-1]["attention_mask"][:2], 0)
    batches.set_state(state)
    assert len(list(batches)) == 2
    with pytest.raises(UserError, match="same number of data shards"):
        batches.set_state({"num_shards": 4, "shards": {}})


def test_saved_data_states_of_all_processes_are_merged(tmp_path):
    """A checkpoint of P processes gives every shard's iterator state to any process layout: the
    checkpoint restores every process's state (opaque to it), the iterator merges them."""
    import json

    from etils import epath

    from jaxdistil.training.checkpoint import DataStateHandler

    for rank, shards in enumerate((("0", "1"), ("2", "3"))):
        state = {"num_shards": 4, "shards": {k: {"pos": int(k) * 10} for k in shards}}
        (tmp_path / f"process_{rank}-of-2.json").write_text(json.dumps(state))
    states = DataStateHandler().restore(epath.Path(tmp_path))
    assert [sorted(s["shards"]) for s in states] == [["0", "1"], ["2", "3"]]

    class Shard:
        def __init__(self, index, count):
            self.pos = None

        def set_state(self, state):
            self.pos = state["pos"]

    batches = gb.ShardedBatches(Shard, 4, 2)  # one process reading all 4 shards
    batches.set_state(states)
    assert [batches.iterators[i].pos for i in range(4)] == [0, 10, 20, 30]
    with pytest.raises(UserError, match="not written by a jaxdistil run"):
        batches.set_state([{"pos": 3}])


def test_single_process_helpers():
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert dist.initialize("none").action == "single"
    assert dist.is_main_process()
    dist.barrier("single")  # no-op
    mesh = jax.make_mesh((4, 2), ("data", "tensor"), devices=jax.devices()[:8])
    sharding = NamedSharding(mesh, P("data"))
    assert gb.process_rows(sharding, 16) == slice(0, 16)
    batch = {"input_ids": np.arange(32, dtype=np.int32).reshape(16, 2), "lengths": np.arange(16)}
    g = gb.global_batch(batch, sharding)
    assert g["input_ids"].sharding == sharding and g["input_ids"].shape == (16, 2)
    np.testing.assert_array_equal(dist.host_value(g["input_ids"]), batch["input_ids"])
    np.testing.assert_array_equal(dist.host_value(g["lengths"]), batch["lengths"])


# --------------------------------------------------------------------------- data shards -> global batches

SHARDED = """
    import json, sys
    import numpy as np
    from jaxdistil import distributed as dist
    from jaxdistil.data import global_batches as gb

    dist.initialize("auto")
    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P

    class FakeShard:  # batches of 2 rows with a random bucket length; shards of uneven lengths
        def __init__(self, index, count, steps=(5, 3, 4, 5)):
            assert count == 4
            self.index, self.pos, self.steps = index, 0, steps[index]
        def __next__(self):
            if self.pos >= self.steps:
                raise StopIteration
            rng = np.random.default_rng([self.index, self.pos])
            t = int(rng.choice([4, 8, 12]))
            self.pos += 1
            return {"input_ids": rng.integers(5, 50, (2, t)).astype(np.int32),
                    "attention_mask": np.ones((2, t), np.int32)}
        def get_state(self):
            return {"pos": self.pos}
        def set_state(self, state):
            self.pos = state["pos"]

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    batches = gb.ShardedBatches(FakeShard, 4, 2, sharding, pad_values={"input_ids": 1})
    print(f"shards={list(batches.shards)}", flush=True)

    def whole(local):
        g = gb.global_batch(local, sharding)
        return {k: np.asarray(multihost_utils.process_allgather(v, tiled=True)).tolist()
                for k, v in g.items()}

    seen, state = [], None
    for step, local in enumerate(batches):
        seen.append(whole(local))
        if step == 1:
            state = batches.get_state()
    # Resume from the state saved after step 1: the same batches again.
    batches.set_state(state)
    again = [whole(local) for local in batches]
    assert again == seen[2:], "resume differs"
    if dist.is_main_process():
        print("RESULT " + json.dumps(seen), flush=True)
"""


def _result(stdout: str) -> list:
    import json

    line = next(line for line in stdout.splitlines() if "RESULT " in line)
    return json.loads(line.split("RESULT ", 1)[1])


@pytest.mark.slow
def test_sharded_batches_do_not_depend_on_the_process_count(tmp_path):
    child = _script(tmp_path, "sharded.py", SHARDED)
    one = _run_launch(["--num-processes", "1", "--devices-per-process", "4", "--", str(child)])
    two = _run_launch(["--num-processes", "2", "--devices-per-process", "2", "--", str(child)])
    assert one.returncode == 0, one.stdout + one.stderr
    assert two.returncode == 0, two.stdout + two.stderr
    assert "[p0] shards=[0, 1, 2, 3]" in one.stdout
    assert "[p0] shards=[0, 1]" in two.stdout and "[p1] shards=[2, 3]" in two.stdout
    a, b = _result(one.stdout), _result(two.stdout)
    assert a == b
    assert len(a) == 5  # the longest shard decides; the others pad
    for step, batch in enumerate(a):
        ids, mask = np.array(batch["input_ids"]), np.array(batch["attention_mask"])
        assert ids.shape[0] == 8
        for shard, steps in enumerate((5, 3, 4, 5)):
            rows = slice(2 * shard, 2 * shard + 2)
            if step >= steps:  # exhausted shard: padding rows
                assert (mask[rows] == 0).all() and (ids[rows] == 1).all()
            else:
                t = int(mask[rows].sum(axis=1)[0])
                assert (ids[rows, t:] == 1).all() and (mask[rows, :t] == 1).all()


# --------------------------------------------------------------------------- acceptance: `train`, 2 processes
#
# A tiny MLM run (2-layer DistilBERT, hidden 32) on a small prepared corpus. The global batch is
# 2 data shards x 8 rows, so 1 process reading both shards and 2 processes reading one each see the
# same batches; buckets [16, 32] make the processes agree on each batch's padded length.

RUN_YAML = """
run_dir: {run_dir}
teacher: {{model: null}}
student:
  init: random
  model_type: distilbert
  config: {{dim: 32, n_layers: 2, n_heads: 2, hidden_dim: 64, max_position_embeddings: 32}}
data: {{dir: {data_dir}}}
loader: {{batch_size: 8, max_len: 32, buckets: [16, 32]}}
loss: {{alpha_ce: 0.0, alpha_mlm: 1.0, alpha_cos: 0.0}}
optim: {{learning_rate: 1.0e-3, warmup_prop: 0.1}}
mesh: {{data: -1}}
train: {{steps: 8, seed: 3, eval_every: 0, log_every: 1}}
checkpoint: {{every: 4, keep: 3, keep_best: 0}}
logging: {{progress: false, tensorboard: false, peak_tflops: 1.0}}
distributed: {{mode: auto, data_shards: 2}}
"""
WORDS = ("the a model data token learns from teacher student layer attention mask word sentence small large "
         "fast slow python function class module returns value list string number file path open read write "
         "train test loss step batch shard seed random order length pad segment position vocabulary").split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from jaxdistil.data.corpus import SourceOptions
    from jaxdistil.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("mh_data")
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, rng.integers(8, 60))) for _ in range(600)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    # No held-out split: evaluation is covered elsewhere, and skipping it saves compilations here.
    prepare(PrepareConfig(str(root / "corpus.txt"), "train:300", root / "data", max_len=32, workers=1,
                          options=SourceOptions(holdout=0.0)), progress=False, log=lambda msg: None)
    return root / "data"


def _config(tmp: Path, data: Path, run_dir: Path) -> Path:
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(RUN_YAML.format(run_dir=run_dir, data_dir=data))
    return path


def _losses(run_dir: Path) -> dict[int, float]:
    import json

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill
            continue
        if record.get("kind") == "train":
            out[record["step"]] = record["loss"]
    return out


def _train_here(config: Path, overrides: list[str]) -> None:
    """1 process x 8 devices: this pytest process (conftest gives it 8 CPU devices)."""
    from jaxdistil.distill.config import load_run_config
    from jaxdistil.train import train

    train(load_run_config(config, overrides), log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def compile_cache() -> dict[str, str]:
    """The session's persistent compilation cache (tests/conftest.py), passed on to the launched
    runs: a relaunch does not compile again."""
    return {k: os.environ[k] for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}


def _train_launched(config: Path, overrides: list[str], processes: int = 2, devices: int = 4,
                    timeout: float = 300) -> subprocess.CompletedProcess:
    return _run_launch(["--num-processes", str(processes), "--devices-per-process", str(devices), "--",
                        "train", "--config", str(config), *overrides], timeout=timeout)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data_dir) -> Path:
    """2 processes x 4 devices, mesh data=8, 8 steps, checkpoints at 4 and 8."""
    tmp = tmp_path_factory.mktemp("mh_runs")
    run_dir = tmp / "p2_data8"
    res = _train_launched(_config(tmp, data_dir, run_dir), ["mesh.data=8"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Only process 0 reports and writes.
    assert "[p0] " in res.stdout + res.stderr
    assert "[p1] 0." not in res.stdout and "[p1] student:" not in res.stdout
    return run_dir


def _assert_close(a: dict[int, float], b: dict[int, float], steps, atol=1e-5):
    assert sorted(a) == sorted(b) == list(steps), (sorted(a), sorted(b))
    worst = max(abs(a[s] - b[s]) for s in steps)
    assert worst <= atol, (worst, a, b)


@pytest.mark.slow
def test_two_processes_equal_one_process_data8(tmp_path, data_dir, two_process_run):
    one = tmp_path / "p1_data8"
    _train_here(_config(tmp_path, data_dir, one), ["mesh.data=8"])
    _assert_close(_losses(two_process_run), _losses(one), range(1, 9))


@pytest.mark.slow
def test_two_processes_equal_one_process_fsdp4_data2(tmp_path, data_dir):
    two, one = tmp_path / "p2_fsdp", tmp_path / "p1_fsdp"
    mesh = ["mesh.data=2", "mesh.fsdp=4", "loader.buckets=[32]"]  # one compilation per run
    res = _train_launched(_config(tmp_path, data_dir, two), mesh)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "'fsdp': 4" in res.stdout
    _train_here(_config(tmp_path, data_dir, one), mesh)
    _assert_close(_losses(two), _losses(one), range(1, 9))


@pytest.mark.slow
def test_checkpoint_of_two_processes_restores_on_another_mesh(tmp_path, two_process_run):
    import shutil

    # The run as it was after step 4: its step-8 checkpoint removed.
    run_dir = tmp_path / "p2_remesh"
    shutil.copytree(two_process_run, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "8")
    config = two_process_run.parent / f"{two_process_run.name}.yaml"
    res = _train_launched(config, [f"run_dir={run_dir}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"[p0] resumed {run_dir} from step 4" in res.stdout
    assert "'tensor': 2" in res.stdout
    _assert_close(_losses(run_dir), _losses(two_process_run), range(1, 9))


class _Launch:
    """A background ``jaxdistil launch`` whose output is collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        import threading

        self.proc = subprocess.Popen(_launch_cmd(*args), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True),
                        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True)]
        for r in self.readers:
            r.start()

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def wait_for(self, condition, what: str, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"launch ended while waiting for {what}:\n{self.text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.1)

    def close(self) -> None:
        """On a failed test: stop the launch (SIGKILL to the launcher kills its children too)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def finish(self, timeout: float = 120) -> float:
        start = time.monotonic()
        self.proc.wait(timeout=timeout)
        for r in self.readers:
            r.join(timeout=10)
        return time.monotonic() - start


@pytest.mark.slow
def test_killed_process_stops_the_launch_and_a_rerun_resumes(tmp_path, data_dir, compile_cache):
    run_dir = tmp_path / "p2_kill"
    config = _config(tmp_path, data_dir, run_dir)
    # Far more steps than the test runs: the run is stopped from outside, never by its end.
    overrides = ["mesh.data=8", "train.steps=2000", "checkpoint.every=10", "checkpoint.keep=2",
                 "loader.buckets=[32]"]
    args = ["--num-processes", "2", "--devices-per-process", "4", "--grace-period", "10",
            "--save-timeout", "60", "--",
            "train", "--config", str(config), *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO), **compile_cache)

    def complete_steps() -> list[int]:  # orbax renames a step's temporary dir once every process wrote it
        d = run_dir / "checkpoints"
        return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []

    # 1. SIGKILL process 1 after two complete checkpoints: the launcher stops process 0.
    first = _Launch(args, env)
    try:
        first.wait_for(lambda: any(s >= 20 for s in complete_steps()), "checkpoint 20")
        # Kill a few steps past a complete checkpoint, so that some logged steps have to be redone.
        first.wait_for(lambda: max(_losses(run_dir)) >= complete_steps()[-1] + 2, "steps past the checkpoint")
        pid = int(re.search(r"\[launch\] p1 pid (\d+)", first.text()).group(1))
        os.kill(pid, signal.SIGKILL)
        stopped_after = first.finish(timeout=90)
    finally:
        first.close()
    assert stopped_after < 60, stopped_after
    assert first.proc.returncode != 0
    assert "[launch] p1 was killed by SIGKILL; stopping the other processes" in first.text()
    before = _losses(run_dir)
    last = complete_steps()[-1]
    assert max(before) >= last

    # 2. The same launch again resumes from the last complete checkpoint. SIGTERM to the launcher
    #    then stops both processes at one agreed step, after a checkpoint that both wrote.
    second = _Launch(args, env)
    try:
        second.wait_for(lambda: last + 10 in complete_steps(), f"checkpoint {last + 10} after the resume")
        second.proc.send_signal(signal.SIGTERM)
        second.finish(timeout=120)
    finally:
        second.close()
    text = second.text()
    assert f"[p0] resumed {run_dir} from step {last}" in text
    assert second.proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert "[launch] exit codes: p0=143 p1=143" in text  # both stopped by themselves, none killed
    stop = int(re.search(r"\[p0\] SIGTERM received: saved a checkpoint at step (\d+)", text).group(1))
    assert complete_steps()[-1] == stop
    after = _losses(run_dir)
    assert sorted(after) == list(range(1, stop + 1))
    # The steps redone after the resume give exactly the losses they gave before the kill.
    redone = [s for s in before if s > last]
    assert redone and all(after[s] == before[s] for s in redone), [(s, before[s], after[s]) for s in redone]


@pytest.mark.slow
def test_two_process_teacher_cache_equals_one_process(tmp_path, data_dir):
    """``cache-teacher`` launched on 2 processes x 4 devices: each process writes its rows, and the
    cache holds, update by update, the arrays one process on 8 devices writes (ids and input ids
    equal, float32 logits and hidden states within 1e-5); the reader stitches the two row blocks."""
    from tiny_runs import make_teacher_dir

    from jaxdistil.cache_teacher import cache_teacher
    from jaxdistil.distill.config import load_run_config
    from jaxdistil.distill.teacher_cache import TeacherCache

    config = _config(tmp_path, data_dir, tmp_path / "run")
    over = [f"teacher.model={make_teacher_dir(tmp_path / 'teacher', data_dir)}", "loss.alpha_ce=5.0",
            "loss.alpha_cos=1.0", "mesh.data=8"]
    res = _run_launch(["--num-processes", "2", "--devices-per-process", "4", "--", "cache-teacher", "--config",
                       str(config), "--output", str(tmp_path / "c2"), "--top-k", "0", "--dtype", "float32",
                       "--no-progress", *over], timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    cache_teacher(load_run_config(config, over), tmp_path / "c1", top_k=0, dtype="float32", log=lambda *a: None,
                  progress=False)
    one, two = TeacherCache(tmp_path / "c1"), TeacherCache(tmp_path / "c2")
    assert [(lo, hi) for lo, hi, _ in one.blocks] == [(0, 16)] and [(lo, hi) for lo, hi, _ in two.blocks] == [(0, 8), (8, 16)]
    assert one.identity == two.identity and one.steps_covered(0, 16) == two.steps_covered(0, 16) == 8
    for step in range(8):
        a, b = one.rows(step, 0, 16), two.rows(step, 0, 16)
        assert set(a) == set(b) == {"input_ids", "top_k_ids", "top_k_logits", "hidden"}
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_allclose(a["hidden"], b["hidden"], atol=1e-5)
        # Ties aside, the same sorted logits; compare the dense logits (ids scattered back).
        dense = [np.take_along_axis(x["top_k_logits"], np.argsort(x["top_k_ids"], -1), -1) for x in (a, b)]
        np.testing.assert_allclose(dense[0], dense[1], atol=1e-5)
