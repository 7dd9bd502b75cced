"""Checkpoints of a run: a ``TrainState`` and the data iterator's state (orbax ``CheckpointManager``).

A run checkpoint ``RUN/checkpoints/<step>/`` holds these items:

  params     the model's parameters (orbax array format, sharded as they were in memory)
  extra      the objective's extra trainable modules (``TrainState.extra``), when it has any
  opt_state  the optimizer state (over ``{"model": params, "extra": extra}``)
  meta       JSON: format, step, the run's base PRNG key data, the ranking metric when there was an
             evaluation
  data       the data iterator's state, one JSON file per process, opaque to this module

``save(state, data_state)`` writes a ``TrainState`` and whatever ``iterator.get_state()`` gave;
``restore(abstract_state)`` gives back a ``TrainState`` placed like the abstract one and the list of
every process's saved iterator state (the iterator knows what to take from it).

Saves are asynchronous: ``save`` returns once the arrays are copied off the accelerator and the
files are written by a background thread. Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves only a temporary directory, which
is never mistaken for a checkpoint (and is removed on the next start). A save that fails (disk
full, permission denied, the directory removed underneath) raises a one-line ``UserError`` naming
the step, the cause and the checkpoints that are still intact.

Restoring reads the latest complete step; if it cannot be read (a corrupt or truncated file), the
step is moved to ``RUN/checkpoints-corrupt/`` and the previous one is tried, with a warning
(read-only users such as ``restore_params`` skip it instead). Abstract arrays that carry shardings
(``jax.ShapeDtypeStruct(..., sharding=...)``) restore straight onto another mesh than the one that
saved.

Format 2 is written since the training core (``jaxdistil.training``) gave the state its ``extra``
modules. A format-1 checkpoint (written before: the optimizer state over the params alone, L_cos's
projection inside the params as ``cos_projection``) is restored too: its optimizer state is read in
its own layout and regrouped into the new one; whatever does not fit is refused with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from jaxdistil.errors import UserError
from jaxdistil.pytrees import path_str
from jaxdistil.training.state import TrainState

FORMAT = 2  # meta["format"] of the checkpoints written now; absent = format 1 (see the module doc)


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
    """Writes the data iterator state captured at save time, one file per process; restores the
    list of all processes' states, in process order.

    The state is captured by the caller (``iterator.get_state()``) when ``save`` is called, so an
    asynchronous save can never record a later position than the one the params belong to.
    """

    def save(self, directory: epath.Path, args: DataStateSave) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: DataStateRestore | None = None) -> list[Any]:
        def index(path) -> int:
            return int(path.name.split("_", 1)[1].split("-of-")[0])

        files = sorted(directory.glob("process_*-of-*.json"), key=index)
        return [json.loads(p.read_text()) for p in files]

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
    """What ``RunCheckpointer.restore`` returns; arrays carry the requested shardings.

    data_states: every saving process's iterator state, in process order (None when not asked).
    """

    state: TrainState
    data_states: list[Any] | None
    meta: dict

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def _warn(message: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _shape_mismatches(abstract: Any, stored: Any, prefix: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """Leaf paths whose stored shape differs from the abstract target (or that exist in one only);
    stored subtrees named in ``ignore`` (top level) are not compared."""
    want = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)}
    have = {}
    for p, x in jax.tree_util.tree_leaves_with_path(stored):
        shape = getattr(x, "shape", None)
        if shape is not None and path_str(p).split("/")[0] not in ignore:
            have[path_str(p)] = tuple(shape)
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


def _restore_args(abstract: Any, partial: bool = False) -> ocp.args.PyTreeRestore:
    """Restore onto ``abstract`` (ShapeDtypeStructs whose ``sharding`` says where each array goes);
    ``partial``: stored arrays that ``abstract`` lacks are skipped."""
    return ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=partial
    )


def _placed(value: Any, like: Any) -> jax.Array:
    """A host value put where the abstract array ``like`` says (its sharding), in its dtype."""
    return jax.device_put(np.asarray(value, dtype=like.dtype), like.sharding)


class RunCheckpointer:
    """The run's ``CheckpointManager`` (``RUN/checkpoints``); call from every process.

    Keeps the latest ``cfg.keep`` steps and, with ``cfg.keep_best``, the best steps by ``metric``
    (``eval_loss``, lower is better, by default; a fine-tuning run ranks by its task score).
    """

    def __init__(self, run_dir: str | Path, cfg: CheckpointConfig | None = None, read_only: bool = False,
                 metric: str = "eval_loss", higher_is_better: bool = False):
        cfg = cfg or CheckpointConfig()
        self.metric = metric
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
                    # BestN keeps the last n in ascending order of the metric (loss: rank by -loss).
                    get_metric_fn=lambda m: (1.0 if higher_is_better else -1.0) * float(m[metric]),
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
        for item in ("params", "opt_state", "extra"):
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
    def save(self, state: TrainState, data_state: Any = None, metric: float | None = None) -> bool:
        """Starts an (async) save of ``state`` at its step; returns False if that step is saved already.

        state: the TrainState (sharded arrays; ``rng`` typed or raw uint32); data_state: the
        iterator's ``get_state()`` (captured now); metric: the value of the ranking metric
        (``keep_best``), recorded in meta under its name.
        """
        if self.read_only:
            raise RuntimeError("this RunCheckpointer was opened read-only")
        self.wait()  # the previous asynchronous save first (orbax would wait for it too)
        step = int(state.step)
        if step in self.manager.all_steps():
            return False
        rng = state.rng
        rng = np.asarray(jax.random.key_data(rng) if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng)
        info = {"format": FORMAT, "step": step, "rng": rng.astype(np.uint32).tolist(), "time": time.time()}
        metrics = None
        if metric is not None:
            info[self.metric] = float(metric)
            metrics = {self.metric: float(metric)}
        items = dict(params=ocp.args.PyTreeSave(state.params), opt_state=ocp.args.PyTreeSave(state.opt_state),
                     meta=ocp.args.JsonSave(info), data=DataStateSave(_jsonable_state(data_state)))
        if jax.tree.leaves(state.extra):
            items["extra"] = ocp.args.PyTreeSave(state.extra)
        args = ocp.args.Composite(**items)
        with self._save_errors(step):
            started = bool(self.manager.save(step, args=args, metrics=metrics, force=True))
        self._pending = step if started and self.cfg.async_save else None
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
                self._pending = None
                self.failed = True
                cause = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
                try:
                    kept = [s for s in self.all_steps() if s != step]
                except Exception:  # noqa: BLE001 - the directory may be gone altogether
                    kept = []
                where = (f"the checkpoints up to step {kept[-1]} are intact" if kept
                         else "no earlier checkpoint exists")
                raise UserError(
                    f"saving the checkpoint of step {step} to {self.directory} failed ({cause[:300]}); "
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
    def check_shapes(self, step: int, abstract: dict[str, Any], ignore: tuple[str, ...] = ()) -> None:
        """UserError if the stored arrays do not have the shapes of ``abstract`` ({item: tree});
        stored top-level subtrees named in ``ignore`` are not compared.

        A checkpoint whose metadata cannot be read at all is left to ``restore`` (corrupt).
        """
        metadata = self.manager.item_metadata(step)
        problems: list[str] = []
        for item, tree in abstract.items():
            if item == "extra":
                # Optional: a step without extra modules was written for another objective (a
                # mismatch, not damage); a missing params or opt_state is damage (read fails later).
                try:
                    stored = metadata[item]
                except (KeyError, AttributeError):
                    stored = None
                stored = {} if stored is None else stored
            else:
                stored = metadata[item]
            problems = problems or _shape_mismatches(tree, stored, item, ignore)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(
                f"run dir {self.run_dir} holds checkpoints of a different model or optimizer "
                f"({problems[0]}{more}); use a new run_dir or the config that made this one"
            )

    def _restore_latest(self, items: Callable[[], dict[str, Any]], shapes: Callable[[int], dict[str, Any]],
                        step: int | None, ignore: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]] | None:
        """The one restore loop: ``step`` (default: the latest readable one) -> (step, items).

        shapes(step): the abstract trees ({item: tree}) that step must hold (checked before reading);
        items(): the restore arguments, called after ``shapes`` for the same step.

        A step that fails to read is moved aside (or, read-only, skipped) and the previous one is
        tried, with a warning; shape mismatches raise UserError; None when there is no checkpoint.
        """
        steps = self.all_steps() if step is None else [step]
        for candidate in reversed(steps):
            try:
                self.check_shapes(candidate, shapes(candidate), ignore)
                out = self.manager.restore(candidate, args=ocp.args.Composite(**items()))
                meta = dict(out.get("meta") or {"step": candidate})
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
                if self.read_only:
                    _warn(f"checkpoint step {candidate} of {self.run_dir} is unreadable ({reason}); "
                          f"using step {older[-1]}")
                else:
                    _warn(
                        f"checkpoint step {candidate} is unreadable ({reason}); moved it to "
                        f"{self.run_dir / 'checkpoints-corrupt'} and falling back to step {older[-1]}"
                    )
                    self._move_aside(candidate)
                continue
            return candidate, out
        return None

    def stored_format(self, step: int) -> int:
        """The format of a saved step (``FORMAT``; 1 for checkpoints written before the field)."""
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception:  # noqa: BLE001 - unreadable: let the restore loop report or skip it
            return FORMAT
        return int((meta or {}).get("format", 1))

    def restore(self, abstract: TrainState, step: int | None = None, with_data: bool = True) -> Restored | None:
        """Restores ``step`` (default: the latest readable one) onto ``abstract``.

        abstract: a TrainState of ``jax.ShapeDtypeStruct`` with ``sharding`` set (the target mesh).
        Returns None when the run has no checkpoint. A format-1 step is read in its own layout
        and regrouped (``_legacy_layout``).
        """
        layout: dict[str, Any] = {}

        def targets(candidate: int) -> dict[str, Any]:
            layout.clear()
            if self.stored_format(candidate) >= 2:
                layout.update(params=abstract.params, opt_state=abstract.opt_state)
                if jax.tree.leaves(abstract.extra):
                    layout["extra"] = abstract.extra
            else:
                layout.update(_legacy_layout(abstract, self.run_dir))
            return layout

        def items() -> dict[str, Any]:
            out = {name: _restore_args(tree) for name, tree in layout.items()}
            out["meta"] = ocp.args.JsonRestore()
            if with_data:
                out["data"] = DataStateRestore()
            return out

        found = self._restore_latest(items, targets, step)
        if found is None:
            return None
        candidate, out = found
        meta = dict(out["meta"])
        if int(meta.get("format", 1)) >= 2:
            params, extra, opt_state = out["params"], out.get("extra", abstract.extra), out["opt_state"]
        else:
            params, extra, opt_state = _from_legacy(out["params"], out["opt_state"], abstract)
        state = TrainState(step=_placed(candidate, abstract.step), params=params, extra=extra,
                           opt_state=opt_state, rng=_placed(meta["rng"], abstract.rng))
        data = [_from_jsonable_state(s) for s in out["data"]] if with_data else None
        return Restored(state=state, data_states=data, meta=meta)

    def restore_params(self, abstract_params: Any, step: int | None = None) -> tuple[int, Any] | None:
        """Only the model's params of ``step`` (default: the latest readable one): (step, params);
        training-only arrays beside them (a format-1 checkpoint's ``cos_projection``) are left out."""
        found = self._restore_latest(lambda: {"params": _restore_args(abstract_params, partial=True)},
                                     lambda _: {"params": abstract_params}, step, ignore=(LEGACY_PROJECTION,))
        return None if found is None else (found[0], found[1]["params"])

    def _move_aside(self, step: int) -> None:
        """Moves a corrupt step out of the manager's directory so that it is never read or overwritten."""
        if jax.process_index() == 0:
            target = self.run_dir / "checkpoints-corrupt"
            target.mkdir(parents=True, exist_ok=True)
            dest = target / f"{step}-{int(time.time())}"
            shutil.move(str(self.directory / str(step)), str(dest))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"jaxdistil_move_aside_{step}")
        self.manager.reload()


# --------------------------------------------------------------------------- format 1

LEGACY_PROJECTION = "cos_projection"  # where format 1 kept L_cos's projection: inside the params


def _is_grouped(x: Any) -> bool:
    return isinstance(x, dict) and set(x) == {"model", "extra"}


def _legacy_layout(abstract: TrainState, run_dir: Path) -> dict[str, Any]:
    """The abstract items of a format-1 checkpoint for ``abstract``: params (with the projection
    inside, if the state has one) and the optimizer state over that tree, with the new shardings."""
    extra = dict(abstract.extra)
    unknown = sorted(set(extra) - {LEGACY_PROJECTION})
    if unknown:
        raise UserError(f"run dir {run_dir} holds checkpoints of an older jaxdistil (format 1), which had no "
                        f"place for the objective's {unknown[0]!r} module; use a new run_dir")

    def old(tree: Any) -> Any:
        if not _is_grouped(tree):
            return tree
        if not tree["extra"]:
            return tree["model"]
        if not isinstance(tree["model"], dict):  # a masked optimizer leaf
            return tree["model"]
        return {**tree["model"], **tree["extra"]}

    params = old({"model": abstract.params, "extra": extra})
    opt_state = jax.tree.map(old, abstract.opt_state, is_leaf=_is_grouped)
    return {"params": params, "opt_state": opt_state}


def _from_legacy(params: Any, opt_state: Any, abstract: TrainState) -> tuple[Any, Any, Any]:
    """(params, extra, opt_state) in the new layout from a format-1 checkpoint's params and
    optimizer state (read with ``_legacy_layout``)."""
    names = set(abstract.extra)
    keys = set(params)

    def new(tree: Any) -> Any:
        if isinstance(tree, dict) and set(tree) == keys:
            return {"model": {k: v for k, v in tree.items() if k not in names},
                    "extra": {k: v for k, v in tree.items() if k in names}}
        return tree

    grouped = new(params)
    opt_state = jax.tree.map(new, opt_state, is_leaf=lambda x: isinstance(x, dict) and set(x) == keys)
    if jax.tree.structure(opt_state) != jax.tree.structure(abstract.opt_state):
        raise UserError("the checkpoint's optimizer state (format 1, an older jaxdistil) does not fit this "
                        "optimizer; resume it with the config that made it, or use a new run_dir")
    return grouped["model"], grouped["extra"], opt_state
