"""Checkpoints of a run (orbax ``CheckpointManager``), and ``restore_params`` for the trained student.

A run checkpoint ``RUN/checkpoints/<step>/`` holds four items:

  params     the student's parameters (orbax array format, sharded as they were in memory)
  opt_state  the optimizer state
  meta       JSON: step, the run's base PRNG key data, the eval loss when there was an evaluation
  data       the data iterator's state, one JSON file per process (each host reads its own shard)

Saves are asynchronous: ``save`` returns once the arrays are copied off the accelerator and the
files are written by a background thread. Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves only a temporary directory, which
is never mistaken for a checkpoint (and is removed on the next start).

Restoring reads the latest complete step; if it cannot be read (a corrupt or truncated file), the
step is moved to ``RUN/checkpoints-corrupt/`` and the previous one is tried, with a warning.
Passing abstract arrays that carry shardings (``jax.ShapeDtypeStruct(..., sharding=...)``) restores
straight onto a different mesh than the one that saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxdistil.errors import UserError
from jaxdistil.models import ModelConfig, load_config
from jaxdistil.models.configs import ConfigError


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep (``checkpoint:`` section of a run config).

    every: save every N optimizer steps (always also at the end and on SIGTERM/Ctrl-C); 0 = end only.
    keep: how many of the latest checkpoints to keep.
    keep_best: also keep this many checkpoints with the lowest held-out loss (a checkpoint is then
      written at every evaluation too); 0 = off.
    async_save: write in a background thread while training continues.
    """

    every: int = 1000
    keep: int = 3
    keep_best: int = 1
    async_save: bool = True

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep < 1 or self.keep_best < 0:
            raise UserError(
                f"checkpoint: every >= 0, keep >= 1 and keep_best >= 0 are required, got every={self.every}, "
                f"keep={self.keep}, keep_best={self.keep_best}"
            )


# --------------------------------------------------------------------------- data iterator state


class DataStateHandler(ocp.CheckpointHandler):
    """Writes the data iterator state captured at save time, one file per process.

    The state is captured by the caller (``iterator.get_state()``) when ``save`` is called, so an
    asynchronous save can never record a later position than the one the params belong to.
    """

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> Any:
        states = [json.loads(p.read_text()) for p in sorted(directory.glob("process_*-of-*.json"))]
        if states and all(isinstance(st, dict) and "shards" in st and "num_shards" in st for st in states):
            # jaxdistil.distributed.ShardedBatches states are keyed by data shard: merged, every
            # process finds the shards it reads, also with another number of processes.
            return {
                "num_shards": states[0]["num_shards"],
                "shards": {k: v for st in states for k, v in st["shards"].items()},
            }
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} missing: the checkpoint was written by a different number of processes"
            )
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any  # JSON-serialisable


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def _jsonable_state(state: Any) -> Any:
    """Iterator states are dicts (grain datasets) or bytes (grain DataLoader); JSON needs text."""
    if isinstance(state, bytes):
        return {"__bytes__": state.decode()}
    return state


def _from_jsonable_state(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return state["__bytes__"].encode()
    return state


# --------------------------------------------------------------------------- run checkpoints


class _DropOrbaxTracebacks(logging.Filter):
    """Orbax logs a failed save with its traceback (ERROR) before raising; the caller reports the
    error in one line instead, so those records are dropped while a save or wait is under way."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and "orbax" in record.pathname)


@contextlib.contextmanager
def _quiet_orbax_errors():
    absl_logger = logging.getLogger("absl")
    flt = _DropOrbaxTracebacks()
    absl_logger.addFilter(flt)
    try:
        yield
    finally:
        absl_logger.removeFilter(flt)


@dataclasses.dataclass
class Restored:
    """What ``RunCheckpointer.restore`` returns; arrays carry the requested shardings."""

    step: int
    params: Any
    opt_state: Any
    rng: np.ndarray  # uint32 key data of the run's base key
    data_state: Any  # the iterator state to ``set_state`` (None if none was saved)
    meta: dict


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _path(path: tuple) -> str:
    """A tree path as ``a/b/0/c``: orbax's metadata turns named tuples (optax states) into dicts,
    so ``[1].count`` in memory is ``[1]['count']`` on disk; both read ``1/count`` here."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shape_mismatches(abstract: Any, stored: Any, prefix: str) -> list[str]:
    """Leaf paths whose stored shape differs from the abstract target (or that exist in one only)."""
    want = {_path(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {}
    for p, x in jax.tree_util.tree_leaves_with_path(stored):
        shape = getattr(x, "shape", None)
        if shape is not None:
            have[_path(p)] = tuple(shape)
    out = []
    for key in sorted(set(want) | set(have)):
        if want.get(key) != have.get(key):
            out.append(f"{prefix}/{key}: stored {have.get(key)} vs expected {want.get(key)}")
    return out


def _pytree_handler() -> ocp.PyTreeCheckpointHandler:
    """Orbax's array handler, without replica-parallel saving.

    Replica-parallel saving splits every replicated array across its replicas, each writing a
    slice; the slicing compiles one tiny XLA program per (shape, device), i.e. hundreds of
    compilations (seconds to minutes) for a data-parallel model on 8 devices. Each shard is written
    once, from its first replica, instead.
    """
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
        (np.number, th.ScalarHandler()),
        (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(use_replica_parallel=False)),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
    """Restore onto ``abstract`` (ShapeDtypeStructs whose ``sharding`` says where each array goes)."""
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
    )


class RunCheckpointer:
    """The run's ``CheckpointManager`` (``RUN/checkpoints``); call from every process.

    Keeps the latest ``cfg.keep`` steps and, with ``cfg.keep_best``, the best steps by ``eval_loss``.
    """

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig | None = None, read_only: bool = False):
        cfg = cfg or CheckpointConfig()
        self.run_dir = Path(run_dir).absolute()
        self.directory = self.run_dir / "checkpoints"
        self.cfg = cfg
        self.read_only = read_only
        self._pending: int | None = None  # the step of an asynchronous save still being written
        self.failed = False  # a save failed (reported once, as a UserError)
        policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=cfg.keep)]
        if cfg.keep_best:
            policies.append(
                ocp.checkpoint_managers.BestN(
                    # BestN keeps the last n in ascending order of the metric: rank by -loss.
                    get_metric_fn=lambda m: -float(m["eval_loss"]),
                    n=cfg.keep_best,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(1),  # the loop decides
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=cfg.async_save,
            # read_only: orbax's own read_only flag logs warnings on every use; not creating the
            # directory, not cleaning it, and never saving reads just the same.
            cleanup_tmp_directories=not read_only,
            create=not read_only,
        )
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        for item in ("params", "opt_state"):
            handler = _pytree_handler()
            registry.add(item, ocp.args.PyTreeSave, handler)
            registry.add(item, ocp.args.PyTreeRestore, handler)
        registry.add("meta", ocp.args.JsonSave)
        registry.add("meta", ocp.args.JsonRestore)
        registry.add("data", DataStateSave, DataStateHandler)
        registry.add("data", DataStateRestore, DataStateHandler)
        self.manager = ocp.CheckpointManager(self.directory, options=options, handler_registry=registry)

    # -- queries
    def all_steps(self) -> list[int]:
        """Complete steps on disk (temporary directories of unfinished saves are not steps)."""
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- save
    def save(
        self,
        step: int,
        params: Any,
        opt_state: Any,
        rng: jax.Array | np.ndarray,
        data_state: Any = None,
        meta: dict | None = None,
        eval_loss: float | None = None,
    ) -> bool:
        """Starts an (async) save of ``step``; returns False if that step is already saved.

        params / opt_state: pytrees of (sharded) arrays; rng: the base key (typed or raw uint32);
        data_state: the iterator's ``get_state()`` (captured now); eval_loss ranks ``keep_best``.
        """
        if self.read_only:
            raise RuntimeError("this RunCheckpointer was opened read-only")
        self.wait()  # the previous asynchronous save first (orbax would wait for it too)
        if step in self.manager.all_steps():
            return False
        rng = np.asarray(
            jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
        )
        info = dict(meta or {}, step=int(step), rng=rng.astype(np.uint32).tolist(), time=time.time())
        metrics = None
        if eval_loss is not None:
            info["eval_loss"] = float(eval_loss)
            metrics = {"eval_loss": float(eval_loss)}
        args = ocp.args.Composite(
            params=ocp.args.PyTreeSave(params),
            opt_state=ocp.args.PyTreeSave(opt_state),
            meta=ocp.args.JsonSave(info),
            data=DataStateSave(_jsonable_state(data_state)),
        )
        with self._save_errors(step):
            started = bool(self.manager.save(int(step), args=args, metrics=metrics, force=True))
        self._pending = int(step) if started and self.cfg.async_save else None
        return started

    @contextlib.contextmanager
    def _save_errors(self, step: int | None):
        """Turns a failed save (disk full, permission denied, the directory removed underneath) into
        a one-line ``UserError`` naming the step, the cause and what still restores."""
        with _quiet_orbax_errors():
            try:
                yield
            except UserError:
                raise
            except Exception as err:
                failed = step
                self._pending = None
                self.failed = True
                cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                try:
                    kept = [s for s in self.all_steps() if s != failed]
                except Exception:  # noqa: BLE001 - the directory may be gone altogether
                    kept = []
                where = (f"the checkpoints up to step {kept[-1]} are intact" if kept
                         else "no earlier checkpoint exists")
                raise UserError(
                    f"saving the checkpoint of step {failed} to {self.directory} failed ({cause[:300]}); "
                    f"{where}: fix the disk or permissions, then run the same command to resume"
                ) from None

    def wait(self) -> None:
        """Blocks until the last async save is on disk (UserError when it failed)."""
        if self._pending is None and not self.cfg.async_save:
            return
        with self._save_errors(self._pending):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        """Waits for the last save and closes the manager. After a failed save, only closes (the
        error was reported already)."""
        if self.failed:
            with _quiet_orbax_errors(), contextlib.suppress(Exception):
                self.manager.close()
            return
        try:
            self.wait()
        finally:
            with _quiet_orbax_errors(), contextlib.suppress(Exception):
                self.manager.close()

    # -- restore
    def check_shapes(self, step: int, abstract_params: Any, abstract_opt_state: Any | None = None) -> None:
        """UserError if the stored arrays do not have the shapes of this run's model.

        A checkpoint whose metadata cannot be read at all is left to ``restore`` (corrupt).
        """
        metadata = self.manager.item_metadata(step)
        problems = _shape_mismatches(abstract_params, metadata["params"], "params")
        if abstract_opt_state is not None and not problems:
            problems = _shape_mismatches(abstract_opt_state, metadata["opt_state"], "opt_state")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"run dir {self.run_dir} holds checkpoints of a different model or optimizer "
                f"({problems[0]}{more}); use a new run_dir or the config that made this one"
            )

    def restore(
        self, abstract_params: Any, abstract_opt_state: Any, step: int | None = None, with_data: bool = True
    ) -> Restored | None:
        """Restores ``step`` (default: the latest readable one) onto the given abstract arrays.

        abstract_*: pytrees of ``jax.ShapeDtypeStruct`` with ``sharding`` set (the target mesh).
        Returns None when the run has no checkpoint. A step that fails to read is moved aside and
        the previous one is tried (with a warning); shape mismatches raise UserError.
        """
        steps = self.all_steps() if step is None else [step]
        for i, candidate in enumerate(reversed(steps)):
            try:
                self.check_shapes(candidate, abstract_params, abstract_opt_state)
                items = {
                    "params": _restore_args(abstract_params),
                    "opt_state": _restore_args(abstract_opt_state),
                    "meta": ocp.args.JsonRestore(),
                }
                if with_data:
                    items["data"] = DataStateRestore()
                out = self.manager.restore(candidate, args=ocp.args.Composite(**items))
                meta = dict(out["meta"])
                if int(meta.get("step", candidate)) != candidate:
                    raise ValueError(f"meta says step {meta.get('step')}")
            except UserError:
                raise
            except Exception as err:
                older = [s for s in steps if s < candidate]
                reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]
                if step is not None or not older:
                    raise UserError(
                        f"checkpoint step {candidate} in {self.directory} is unreadable ({reason}) and no "
                        f"older checkpoint remains; delete {self.directory} to start over"
                    ) from err
                _warn(
                    f"checkpoint step {candidate} is unreadable ({reason}); moved it to "
                    f"{self.run_dir / 'checkpoints-corrupt'} and falling back to step {older[-1]}"
                )
                self._move_aside(candidate)
                continue
            return Restored(
                step=candidate,
                params=out["params"],
                opt_state=out["opt_state"],
                rng=np.asarray(meta["rng"], dtype=np.uint32),
                data_state=_from_jsonable_state(out["data"]) if with_data else None,
                meta=meta,
            )
        return None

    def _move_aside(self, step: int) -> None:
        """Moves a corrupt step out of the manager's directory so that it is never read or overwritten."""
        if jax.process_index() == 0:
            target = self.run_dir / "checkpoints-corrupt"
            target.mkdir(parents=True, exist_ok=True)
            dest = target / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), str(dest))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"jaxdistil_move_aside_{step}")
        self.manager.reload()


def restore_params(run_dir: str | Path, step: int | None = None) -> tuple[int, ModelConfig, Any]:
    """The trained student of a run: (step, model config, params as numpy arrays).

    run_dir: a jaxdistil run directory (``RUN/student/config.json`` + ``RUN/checkpoints``).
    step: a saved step; default the latest readable one.
    """
    run_dir = Path(run_dir)
    cfg_path = run_dir / "student" / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a jaxdistil run directory (no student/config.json)")
    try:
        model_cfg = load_config(cfg_path)
    except ConfigError as err:
        raise UserError(str(err)) from err
    ckpt = RunCheckpointer(run_dir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise UserError(f"run {run_dir} has no checkpoint yet; train it for at least one save first")
    if step is not None and step not in steps:
        raise UserError(f"run {run_dir} has no checkpoint at step {step}; saved steps: {steps}")
    from jaxdistil.models import build_model, init_params

    abstract = jax.eval_shape(lambda: init_params(build_model(model_cfg), jax.random.PRNGKey(0)))
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), abstract)
    candidates = [step] if step is not None else list(reversed(steps))
    last_err: Exception | None = None
    for candidate in candidates:
        try:
            meta = ckpt.manager.item_metadata(candidate)
            problems = _shape_mismatches(abstract, meta["params"], "params")
            if problems:
                raise UserError(
                    f"run {run_dir}: stored params do not match student/config.json ({problems[0]})"
                )
            out = ckpt.manager.restore(candidate, args=ocp.args.Composite(params=_restore_args(abstract)))
        except UserError:
            raise
        except Exception as err:  # noqa: BLE001
            last_err = err
            if step is None and candidate != candidates[-1]:
                _warn(
                    f"checkpoint step {candidate} of {run_dir} is unreadable ({type(err).__name__}); "
                    f"trying the previous one"
                )
            continue
        ckpt.manager.close()
        return candidate, model_cfg, jax.tree.map(np.asarray, out["params"])
    ckpt.manager.close()
    raise UserError(
        f"no readable checkpoint in {run_dir / 'checkpoints'} ({type(last_err).__name__}: {last_err})"
    )
