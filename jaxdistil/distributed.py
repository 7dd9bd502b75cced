"""Multi-process runs through ``jax.distributed``: joining the job, process 0, barriers, agreed stops.

One jaxdistil run may span several processes (the hosts of a TPU pod slice, the tasks of a SLURM
job, or the local processes started by ``jaxdistil launch``). Every process runs the same program;
``jax.distributed`` connects them so that ``jax.devices()`` lists the devices of all processes and
one jitted step runs over the global mesh.

``initialize(cfg)`` must run before any other JAX call (before ``jax.devices()``, ``jax.random.key``
or any computation), because JAX fixes the set of devices when its backend starts. It decides how
to join the job:

  mode ``auto`` (default)
    1. ``coordinator_address``, ``num_processes`` and ``process_id`` all known, from the config or
       from the environment variables ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``,
       ``JAX_PROCESS_ID`` (config wins): join that job.
    2. else a cluster that ``jax.distributed.initialize()`` detects by itself (Cloud TPU VM /
       pod slice, SLURM ``srun`` with several tasks, Open MPI ``mpirun``): let JAX fill in the
       missing values, exactly as ``jax.distributed.initialize()`` with no arguments.
    3. else a plain single process (no coordinator).
  mode ``explicit``: case 1 only; anything missing is an error naming it.
  mode ``none``: never initialise ``jax.distributed`` (single process, whatever the environment).

A SLURM or Open MPI environment with one task is treated as single-process: JAX would otherwise pin
the process to one local device (``SLURM_LOCALID``) and hide the node's other GPUs.

On CPU the cross-process collectives run over gloo (``jax_cpu_collectives_implementation``), set
before the backend starts unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` names another one.

After joining, the train loop uses (the global batches themselves: ``jaxdistil.data.global_batches``):
  agreed_stop        every process stops after the same step once any of them got SIGTERM
  is_main_process    process 0 writes logs, TensorBoard events and exports
  barrier            wait for every process (coordination service, no device computation)
  share_from_main    process 0's decision on every process (e.g. the run directory's lock)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination service client (no public API)
from jax.experimental import multihost_utils

from jaxdistil.errors import UserError
from jaxdistil.launcher import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

MODES = ("auto", "explicit", "none")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How this process joins a multi-process run (YAML section ``distributed``).

    mode: ``auto`` | ``explicit`` | ``none`` (see the module docstring).
    coordinator_address: ``host:port`` of process 0's coordinator; None -> $JAX_COORDINATOR_ADDRESS
        or the detected cluster's.
    num_processes: processes in the job; None -> $JAX_NUM_PROCESSES or the detected cluster's.
    process_id: this process's rank in [0, num_processes); None -> $JAX_PROCESS_ID or the cluster's.
    local_device_ids: the local accelerators this process drives; () = JAX's choice ($JAX_LOCAL_DEVICE_IDS
        or, on SLURM/Open MPI, the one numbered by the local rank).
    initialization_timeout: seconds to wait for every process to join before giving up.
    data_shards: data shards read per step (``ShardedBatches``); 0 = one per process.
    """

    mode: str = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] = ()
    initialization_timeout: int = 300
    data_shards: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"distributed.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise UserError(f"distributed.num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.process_id < 0:
            raise UserError(f"distributed.process_id must be >= 0, got {self.process_id}")
        if self.initialization_timeout < 1:
            raise UserError("distributed.initialization_timeout must be >= 1 s, "
                            f"got {self.initialization_timeout}")
        if self.data_shards < 0:
            raise UserError(f"distributed.data_shards must be >= 0 (0 = one per process), "
                            f"got {self.data_shards}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """What ``initialize`` will do, decided from the config and the environment alone (no JAX calls).

    action: ``single`` (no jax.distributed), ``explicit`` (all three values known) or ``cluster``
    (jax.distributed.initialize fills in what is missing from the detected cluster ``cluster``).
    """

    action: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] = ()
    cluster: str | None = None
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """The outcome of ``initialize``: this process's place in the job."""

    process_id: int
    num_processes: int
    coordinator_address: str | None
    action: str

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


def _as_config(cfg: Any) -> DistributedConfig:
    """Accept this dataclass, any object with (some of) its fields (the run config's ``distributed``
    section), a plain mapping (from YAML) or a bare mode string (``distributed: auto``)."""
    if cfg is None:
        return DistributedConfig()
    if isinstance(cfg, DistributedConfig):
        return cfg
    if isinstance(cfg, str):
        return DistributedConfig(mode=cfg)
    known = [f.name for f in dataclasses.fields(DistributedConfig)]
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise UserError(f"unknown key distributed.{unknown[0]}; known keys: {', '.join(known)}")
        values = dict(cfg)
    else:
        values = {name: getattr(cfg, name) for name in known if hasattr(cfg, name)}
    if values.get("local_device_ids") is None:
        values.pop("local_device_ids", None)
    return DistributedConfig(**values)


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; "
                        "set it to a number or unset it")


def detect_cluster(environ: Mapping[str, str] | None = None) -> tuple[str, int | None] | None:
    """The cluster environment ``jax.distributed.initialize()`` would detect, without starting JAX.

    Returns (name, process count if the environment states it, else None) or None. Uses JAX's own
    detectors when they are importable (TPU VM / pod slice, SLURM, Open MPI, Kubernetes...), so
    ``auto`` agrees with ``jax.distributed.initialize()``; falls back to the SLURM and Open MPI
    environment variables JAX reads. With ``environ`` given (tests), only those variables are used.
    """
    env = os.environ if environ is None else environ
    if environ is None:
        try:  # JAX's registry of cluster detectors (private API: guarded)
            from jax._src.clusters import ClusterEnv

            for kind in ClusterEnv._cluster_types:
                if getattr(kind, "opt_in_only_method", False):
                    continue  # mpi4py: only when asked for by name
                try:
                    present = kind.is_env_present()
                except Exception:  # a detector that cannot run here (missing package, no metadata server)
                    present = False
                if present:
                    count = None
                    if kind.__name__ in ("SlurmCluster", "OmpiCluster"):
                        count = kind.get_process_count()
                    return kind.__name__, count
            return None
        except (ImportError, AttributeError):
            pass
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(k in env for k in slurm):
        return "SlurmCluster", _env_int(env, "SLURM_NTASKS")
    if "OMPI_MCA_orte_hnp_uri" in env:
        return "OmpiCluster", _env_int(env, "OMPI_COMM_WORLD_SIZE")
    return None


def plan(cfg: Any = None,
         environ: Mapping[str, str] | None = None) -> Plan:
    """Decide how to join the job from the config and the environment (pure: no JAX backend calls).

    ``environ`` defaults to ``os.environ``; passing one also restricts cluster detection to it.
    """
    cfg = _as_config(cfg)
    if cfg.mode == "none":
        return Plan("single", reason="distributed.mode=none")
    env = os.environ if environ is None else environ
    address = cfg.coordinator_address or env.get(ENV_COORDINATOR) or None
    count = cfg.num_processes if cfg.num_processes is not None else _env_int(env, ENV_NUM_PROCESSES)
    rank = cfg.process_id if cfg.process_id is not None else _env_int(env, ENV_PROCESS_ID)
    devices = tuple(cfg.local_device_ids)
    given = {"coordinator_address": address, "num_processes": count, "process_id": rank}
    missing = [k for k, v in given.items() if v is None]

    if count is not None and count < 1:
        raise UserError(f"distributed.num_processes={count} must be at least 1")
    if rank is not None and count is not None and not 0 <= rank < count:
        raise UserError(f"distributed.process_id={rank} must be in [0, {count}) for num_processes={count}")
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise UserError(f"distributed.coordinator_address={address!r} must look like HOST:PORT "
                        "(e.g. 10.0.0.1:1234)")

    if not missing:
        if count == 1:
            return Plan("single", reason="num_processes=1")
        return Plan("explicit", address, count, rank, devices,
                    reason="coordinator, process count and id given")
    hint = (f"set distributed.{', distributed.'.join(missing)} (or ${ENV_COORDINATOR}, ${ENV_NUM_PROCESSES}, "
            f"${ENV_PROCESS_ID}) or use distributed.mode=none")
    if cfg.mode == "explicit":
        raise UserError(f"distributed.mode=explicit but {', '.join(missing)} not given; {hint}")
    cluster = detect_cluster(environ)
    if cluster is not None:
        name, cluster_count = cluster
        if cluster_count == 1 and count in (None, 1):
            return Plan("single", cluster=name, reason=f"{name} with a single process")
        return Plan("cluster", address, count, rank, devices, cluster=name, reason=f"detected {name}")
    if len(missing) < 3:
        raise UserError(f"distributed: {', '.join(k for k in given if k not in missing)} given but "
                        f"{', '.join(missing)} missing and no cluster detected; {hint}")
    return Plan("single", reason="no coordinator given and no cluster detected")


def _backends_started() -> bool:
    try:  # private API: guarded
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):
        return False


def initialize(cfg: Any = None) -> ProcessInfo:
    """Join the multi-process job described by ``cfg`` and the environment; call before any JAX use.

    cfg: a DistributedConfig, the run config's ``distributed`` section, a mapping of its fields, a
    mode string (``"auto"``) or None (auto). Returns ProcessInfo(process_id, num_processes,
    coordinator_address, action), action ``single`` (no jax.distributed), ``explicit``, ``cluster``,
    or ``already``: idempotent, a second call (or one after someone else initialised
    jax.distributed) returns this process's place without joining again.
    Raises UserError for inconsistent settings, when JAX was already used, or when the job cannot
    be joined within ``initialization_timeout``.
    """
    if jax_distributed.global_state.client is not None:
        return ProcessInfo(jax.process_index(), jax.process_count(),
                           jax_distributed.global_state.coordinator_address, "already")
    p = plan(cfg)
    if p.action == "single":
        return ProcessInfo(0, 1, None, "single")
    if _backends_started():
        raise UserError("JAX was used before jaxdistil.distributed.initialize(); call initialize() first "
                        "(before jax.devices(), random keys or any computation)")
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
        # Cross-process collectives of the CPU backend (all-reduces of a CPU mesh, and the
        # host-side syncs orbax and multihost_utils do on every platform).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = _as_config(cfg).initialization_timeout
    kwargs: dict[str, Any] = {"initialization_timeout": timeout}
    if p.local_device_ids:
        kwargs["local_device_ids"] = list(p.local_device_ids)
    try:
        if p.action == "explicit":
            jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id,
                                       cluster_detection_method="deactivate", **kwargs)
        else:
            jax.distributed.initialize(p.coordinator_address, p.num_processes, p.process_id, **kwargs)
    except (RuntimeError, ValueError) as err:
        where = f"{p.coordinator_address or 'the detected coordinator'}"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not join the jax.distributed job at {where} ({p.reason}): {first}; "
                        "check that all processes started and the coordinator port is reachable") from err
    return ProcessInfo(jax.process_index(), jax.process_count(),
                       jax_distributed.global_state.coordinator_address, p.action)


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, TensorBoard events and exports."""
    return jax.process_index() == 0


def num_data_shards(cfg: Any = None) -> int:
    """Data shards per global batch: ``cfg.data_shards`` when set, else one per process."""
    value = cfg.get("data_shards", 0) if isinstance(cfg, Mapping) else getattr(cfg, "data_shards", 0)
    return int(value or 0) or jax.process_count()


def agreed_stop(step: int) -> bool:
    """True on every process at the same step once any process got SIGTERM (multi-process runs).

    ``jax.distributed`` installs a SIGTERM notifier in each process (a TPU preemption notice, a
    SLURM ``scancel``, the launcher stopping the job); processes then agree through the coordination
    service on the first step every one of them has not yet passed, so all of them stop after the
    same step and can take part in one checkpoint save. Costs nothing until a signal arrives. Call it
    once per step with increasing ``step``. Never install a Python SIGTERM handler in a multi-process
    run: it would replace JAX's notifier (forward other signals as SIGTERM to yourself instead).
    Single process: always False (handle signals directly).
    """
    if jax.process_count() == 1:
        return False
    return bool(multihost_utils.reached_preemption_sync_point(int(step)))


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Block until every process reaches the barrier ``name`` (no-op with one process).

    Uses the coordination service's barrier (no device computation), so it works before a mesh
    exists and costs one round trip. Each ``name`` must be reached by every process; reuse a name
    only after every process has passed its previous use.
    """
    if jax.process_count() == 1:
        return
    client = jax_distributed.global_state.client
    if client is None:  # several processes without the coordination service: fall back to devices
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"jaxdistil:{name}", int(timeout_s * 1000))


def share_from_main(name: str, value: str | None = None, timeout_s: float = 600.0) -> str:
    """Process 0's ``value`` on every process: process 0 passes it, the others wait for it (a barrier).

    Goes through the coordination service's key-value store (no device computation), so it works
    before a mesh exists; ``name`` must be used once per job. With one process: returns ``value``.
    """
    if jax.process_count() == 1:
        return value or ""
    client = jax_distributed.global_state.client
    key = f"jaxdistil:{name}"
    if jax.process_index() == 0:
        client.key_value_set(key, value or "")
        return value or ""
    return client.blocking_key_value_get(key, int(timeout_s * 1000))


def host_value(x: jax.Array) -> np.ndarray:
    """A replicated (or fully addressable) global array as numpy on this process, e.g. step metrics."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
