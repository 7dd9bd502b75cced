"""Global batches of a multi-process run: each process feeds its own rows of every batch.

  ShardedBatches   the process-local rows of each global batch, read from data shards so that the
                   batches do not depend on the number of processes (padded to one length)
  process_rows     which rows of a global [B, ...] batch a process must supply under a sharding
  global_batch     process-local numpy rows -> global jax.Arrays (make_array_from_process_local_data)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxdistil.errors import UserError


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> slice:
    """The contiguous rows of a [global_batch, ...] array this process must supply under ``sharding``.

    With the batch sharded over every device this is ``slice(p * B/P, (p+1) * B/P)`` for process p
    of P; when processes are replicas along the batch (e.g. the batch is split over fewer devices
    than there are processes), several processes get the same rows and must feed identical data.
    """
    try:
        index = sharding.addressable_devices_indices_map((global_batch,))
    except ValueError as err:  # jax's IndivisibleError
        raise UserError(f"a batch of {global_batch} rows does not split evenly over the devices of "
                        f"{sharding}; use a batch size that the batch axes divide") from err
    starts, stops = [], []
    for idx in index.values():
        rows = idx[0] if idx else slice(None)
        start, stop, _ = rows.indices(global_batch)
        starts.append(start)
        stops.append(stop)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for a, b in zip(starts, stops):
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise UserError(f"this process's devices hold non-contiguous batch rows under {sharding}; "
                        "order the mesh so that each process's devices are adjacent along the batch axes")
    return slice(lo, hi)


def global_batch(local_batch: Any, sharding: Any) -> Any:
    """Assemble global arrays from each process's part of the batch.

    local_batch: pytree (e.g. the loader's dict) of numpy arrays [B_local, ...], this process's rows
        (``process_rows(sharding, B)`` of the global batch; B_local = B / P with the batch sharded
        over all P processes).
    sharding: one ``jax.sharding.Sharding`` for every leaf (e.g. NamedSharding(mesh, P(("data", "fsdp"))))
        or a pytree of shardings matching local_batch.
    Returns the same pytree of global ``jax.Array`` [B, ...] laid out by ``sharding``; with a single
    process this is a plain sharded device_put.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                            local_batch)
    return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, np.asarray(x)),
                        sharding, local_batch)


class ShardedBatches:
    """This process's rows of each global batch, made of ``num_shards`` data shards.

    The data is cut into ``num_shards`` shards (the loader's ``shard_index`` / ``shard_count``); each
    global batch is the concatenation, in shard order, of one batch of ``rows_per_shard`` rows from
    every shard. A process reads only the shards whose rows its devices hold under ``sharding``
    (with the batch split over all P processes and num_shards = P: shard p on process p). So the
    global batches, and hence the losses, depend on the seed and ``num_shards`` only, not on how
    many processes read them: 1 process reading 2 shards equals 2 processes reading one each.

    Every step the processes agree (one tiny all-gather) on the padded length T = the longest of
    all shards' batches, so length-bucketed batches of different shards stack into one global
    [B, T] array. A shard that runs out (an uneven held-out split) contributes all-padding rows
    (attention_mask 0, counted by no loss) until every shard is done, so all processes stay in
    lockstep and stop together.

    make_shard(index, count) -> iterator of batches (dicts of numpy [rows_per_shard, T] arrays) with
        ``get_state`` / ``set_state``, e.g. the grain loader
        ``make_loader(..., shard_index=index, shard_count=count)``.
    sharding: the batch sharding (e.g. NamedSharding(mesh, P(("data", "fsdp")))); None = shard blocks
        by process index (process p reads shards [p S/P, (p+1) S/P)).
    pad_values: padding value per key (e.g. {"input_ids": pad_id}); other keys pad with 0.
    ``next()`` returns the process-local rows {key: [len(self.shards) * rows_per_shard, T]}, ready for
    ``global_batch`` / ``make_array_from_process_local_data``.
    """

    def __init__(self, make_shard, num_shards: int | None, rows_per_shard: int,
                 sharding: jax.sharding.Sharding | None = None, pad_values: Mapping[str, int] | None = None):
        count = jax.process_count()
        self.num_shards = int(num_shards or count)
        self.rows_per_shard = int(rows_per_shard)
        self.pad_values = dict(pad_values or {})
        if sharding is None:
            if self.num_shards % count:
                raise UserError(f"{self.num_shards} data shards do not split over {count} processes; "
                                f"use a multiple of {count}")
            per = self.num_shards // count
            first = jax.process_index() * per
            self.shards = tuple(range(first, first + per))
        else:
            rows = process_rows(sharding, self.num_shards * self.rows_per_shard)
            if rows.start % self.rows_per_shard or rows.stop % self.rows_per_shard:
                raise UserError(
                    f"{self.num_shards} data shards of {self.rows_per_shard} rows do not align with this "
                    f"process's batch rows {rows.start}:{rows.stop}; use a multiple of the processes "
                    f"({count}) as the number of data shards")
            self.shards = tuple(range(rows.start // self.rows_per_shard, rows.stop // self.rows_per_shard))
        self.iterators = {i: make_shard(i, self.num_shards) for i in self.shards}
        self._template: dict[str, tuple[tuple[int, ...], np.dtype]] | None = None

    def __iter__(self) -> ShardedBatches:
        return self

    def _agree(self, length: int, have: int) -> tuple[int, int]:
        """(max length, any batch left) over all processes."""
        if jax.process_count() == 1:
            return length, have
        both = np.asarray(multihost_utils.process_allgather(np.array([length, have], np.int32)))
        return int(both[:, 0].max()), int(both[:, 1].max())

    def _pad(self, batch: Mapping[str, np.ndarray] | None, length: int) -> dict[str, np.ndarray]:
        if batch is None:  # an exhausted shard: rows of padding only
            assert self._template is not None
            return {k: np.full((self.rows_per_shard, length) + shape[2:], self.pad_values.get(k, 0), dtype)
                    for k, (shape, dtype) in self._template.items()}
        out = {}
        for key, value in batch.items():
            value = np.asarray(value)
            if value.ndim >= 2 and value.shape[1] < length:
                widths = [(0, 0), (0, length - value.shape[1])] + [(0, 0)] * (value.ndim - 2)
                value = np.pad(value, widths, constant_values=self.pad_values.get(key, 0))
            out[key] = value
        return out

    def __next__(self) -> dict[str, np.ndarray]:
        local = {i: next(it, None) for i, it in self.iterators.items()}
        seen = [b for b in local.values() if b is not None]
        if seen and self._template is None:
            self._template = {k: (np.shape(v), np.asarray(v).dtype) for k, v in seen[0].items()}
        length = max((np.shape(b["input_ids"])[1] for b in seen), default=0)
        length, have = self._agree(length, int(bool(seen)))
        if not have:
            raise StopIteration
        if self._template is None:
            raise UserError("this process's data shards are empty while others still have batches; "
                            "use more held-out data or fewer processes")
        parts = [self._pad(local[i], length) for i in self.shards]
        return {k: np.concatenate([p[k] for p in parts]) if len(parts) > 1 else parts[0][k] for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        """{"num_shards": S, "shards": {"<index>": state of that shard's iterator}} for this process."""
        return {"num_shards": self.num_shards,
                "shards": {str(i): it.get_state() for i, it in self.iterators.items()}}

    def set_state(self, state: Mapping[str, Any] | list[Mapping[str, Any]]) -> None:
        """Resumes from ``get_state()``, or from the saved states of all processes of a run (a list,
        as a checkpoint restores them): their shards are merged, so each process finds the shards it
        reads, also with another number of processes."""
        if isinstance(state, list):
            if not state or not all(isinstance(s, Mapping) and "shards" in s for s in state):
                raise UserError("the checkpoint's data state was not written by a jaxdistil run; "
                                "resume with the run that wrote it or use a new run_dir")
            state = {"num_shards": state[0]["num_shards"],
                     "shards": {k: v for s in state for k, v in s["shards"].items()}}
        if int(state.get("num_shards", -1)) != self.num_shards:
            raise UserError(f"the saved data state has {state.get('num_shards')} data shards, this run "
                            f"{self.num_shards}; resume with the same number of data shards")
        for i, it in self.iterators.items():
            if str(i) not in state["shards"]:
                raise UserError(f"the saved data state of this process lacks shard {i}: it was written by "
                                "another process layout; resume with the same processes and mesh")
            it.set_state(state["shards"][str(i)])
