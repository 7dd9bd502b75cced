"""A grain loader over the ArrayRecord shards written by ``jaxdistil prepare``.

Pipeline (each stage a grain dataset, so the whole iterator is checkpointable)::

  ArrayRecordDataSource(shards) -> this host's slice -> shuffle(seed, per epoch) -> repeat(epochs)
    -> decode ids (truncate to max_len) -> to_iter_dataset (threaded reads)
    -> length-grouped batches padded to a bucket length            (default)
       or first-fit packing into [B, max_len] rows with segment ids (packed=True)
    -> background-thread prefetch

Batches are dicts of numpy int32 arrays [B, T]: ``input_ids``, ``attention_mask`` and, when packed,
``segment_ids`` (1, 2, ... per sequence in a row, 0 = padding) and ``position_ids`` (restarting at 0
for each sequence). T is one of ``bucket_lengths(cfg)`` (always ``max_len`` when packed), so a
jitted step compiles at most once per bucket. Evaluation (``eval_batches``: one pass over the
held-out split, no shuffle) always uses padded batches, and every host yields the same number.

Length grouping (the reference's ``group_by_size``, made streaming and resumable): read a window of
``batch_size * group_window`` sequences, sort them by length, cut into batches, pad each batch to
the smallest bucket that fits its longest sequence, and emit the window's batches in a seeded
random order. The iterator state is the parent's state at the window start plus the number of
batches already emitted, so a restore replays at most one window of reads.

State: ``it.get_state()`` is a small JSON-serialisable dict and ``it.set_state(state)`` resumes
exactly; save it with a checkpoint through ``grain.checkpoint.CheckpointSave(it)`` (orbax's
``CheckpointManager``) or ``ocp.args.JsonSave(it.get_state())``.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np

from jaxdistil.data import manifest as manifest_lib
from jaxdistil.errors import UserError

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """How batches are made.

    batch_size: sequences (rows) per batch on this host.
    max_len: longest row; longer sequences are truncated (ending in [SEP]).
    packed: pack several sequences per row (segment_ids / position_ids) instead of padding.
    buckets: padded lengths of length-grouped batches (capped at max_len, which is always one).
    seed: data order (shuffle, window order, packing); independent of the training seed.
    shuffle: shuffle the training split each epoch (evaluation is never shuffled).
    num_epochs: passes over the training split; None = repeat forever (the loop counts steps).
    group_window: batches per length-grouping window (larger = less padding, more memory).
    group_rows: rows per length group; 0 = a whole batch is one group (each batch holds sequences of
      one length range). N > 0: the sorted window is cut into groups of N rows and each batch is
      made of batch_size / N groups drawn across the window, so every batch mixes lengths as the
      reference's updates do (its sampler groups by length per micro-batch of 5, then mixes the
      micro-batches); the batch is padded to its longest row, group i is rows [i N, (i+1) N).
      With ``loss.normalize: group`` each group is also masked and averaged on its own.
    pack_bins: rows filled at once by the first-fit packer (larger = fuller rows).
    read_threads: threads reading records.
    prefetch: batches prepared ahead in a background thread (0 = none).
    """

    batch_size: int = 32
    max_len: int = 128
    packed: bool = False
    buckets: tuple[int, ...] = (32, 64, 128, 256, 512)
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    group_window: int = 64
    group_rows: int = 0
    pack_bins: int = 64
    read_threads: int = 4
    prefetch: int = 2

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"loader.batch_size must be >= 1, got {self.batch_size}")
        if self.max_len < 4:
            raise UserError(f"loader.max_len must be >= 4, got {self.max_len}")
        if any(b < 1 for b in self.buckets):
            raise UserError(f"loader.buckets must be positive lengths, got {self.buckets}")
        if not 0 <= self.seed < 2**32:
            raise UserError(f"loader.seed must be in [0, 2**32), got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise UserError(f"loader.num_epochs must be >= 1 or null (forever), got {self.num_epochs}")
        if self.group_window < 1 or self.pack_bins < 1:
            raise UserError("loader.group_window and loader.pack_bins must be >= 1")
        if self.group_rows < 0 or (self.group_rows and self.batch_size % self.group_rows):
            raise UserError(f"loader.group_rows must be 0 or divide loader.batch_size={self.batch_size}, "
                            f"got {self.group_rows}")
        if self.read_threads < 1 or self.prefetch < 0:
            raise UserError("loader.read_threads must be >= 1 and loader.prefetch >= 0")


def bucket_lengths(cfg: LoaderConfig, train: bool = True) -> tuple[int, ...]:
    """The lengths T batches can have: buckets below max_len, then max_len; packed training
    batches are always max_len (evaluation is never packed)."""
    if cfg.packed and train:
        return (cfg.max_len,)
    return tuple(sorted({b for b in cfg.buckets if b < cfg.max_len} | {cfg.max_len}))


class DecodeIds:
    """ArrayRecord bytes -> int32 ids [L], truncated to ``max_len`` with the final [SEP] kept."""

    def __init__(self, dtype: str, max_len: int, sep_id: int):
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.max_len = max_len
        self.sep_id = sep_id

    def __call__(self, record: bytes) -> np.ndarray:
        ids = np.frombuffer(record, dtype=self.dtype).astype(np.int32)
        if ids.shape[0] > self.max_len:
            ids = ids[: self.max_len].copy()
            ids[-1] = self.sep_id
        return ids


def _pad_rows(rows: Sequence[np.ndarray], batch_size: int, length: int, pad_id: int) -> Batch:
    """Stack variable-length rows into [batch_size, length]; missing rows are all padding."""
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class _LengthGroupedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, ds: LengthGroupedBatchIterDataset):
        super().__init__(parent)
        self._ds = ds
        self._window_index = 0  # windows started so far (seeds the batch order)
        self._window_start_state = parent.get_state()
        self._batches: list[list[np.ndarray]] = []
        self._emitted = 0
        self._count = 0  # batches returned so far
        self._exhausted = False

    def _fill_window(self) -> None:
        ds = self._ds
        self._window_start_state = self._parent.get_state()
        seqs: list[np.ndarray] = []
        for _ in range(ds.batch_size * ds.window):
            try:
                seqs.append(next(self._parent))
            except StopIteration:
                self._exhausted = True
                break
        lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
        order = np.argsort(lengths, kind="stable")  # stable: ties keep the (shuffled) read order
        rows = ds.group_rows or ds.batch_size
        groups = [[seqs[j] for j in order[i : i + rows]] for i in range(0, len(seqs), rows)]
        if groups and ds.drop_remainder and len(groups[-1]) < rows:
            groups.pop()
        if ds.shuffle and len(groups) > 1:
            perm = np.random.default_rng([ds.seed, self._window_index]).permutation(len(groups))
            groups = [groups[p] for p in perm]
        per_batch = ds.batch_size // rows
        batches = [sum(groups[i : i + per_batch], []) for i in range(0, len(groups), per_batch)]
        if batches and ds.drop_remainder and len(batches[-1]) < ds.batch_size:
            batches.pop()
        self._batches = batches
        self._emitted = 0

    def __next__(self) -> Batch:
        while self._emitted >= len(self._batches):
            if self._exhausted:
                if self._count < self._ds.min_batches:  # all-padding batches keep hosts in step
                    self._count += 1
                    return _pad_rows([], self._ds.batch_size, self._ds.buckets[0], self._ds.pad_id)
                raise StopIteration
            self._fill_window()
            self._window_index += 1
        rows = self._batches[self._emitted]
        self._emitted += 1
        self._count += 1
        longest = max(len(r) for r in rows)
        length = next(b for b in self._ds.buckets if b >= longest)
        return _pad_rows(rows, self._ds.batch_size, length, self._ds.pad_id)

    def get_state(self) -> dict[str, Any]:
        if self._emitted >= len(self._batches):  # between windows: nothing buffered
            return {
                "parent": self._parent.get_state(),
                "window_index": self._window_index,
                "emitted": 0,
                "count": self._count,
            }
        return {
            "parent": self._window_start_state,
            "window_index": self._window_index - 1,
            "emitted": self._emitted,
            "count": self._count,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._window_index = int(state["window_index"])
        self._count = int(state.get("count", 0))
        self._exhausted = False
        self._batches, self._emitted = [], 0
        if state["emitted"]:
            # Re-read the window the saved iterator was in and skip what it had emitted.
            self._fill_window()
            self._window_index += 1
            self._emitted = int(state["emitted"])


class LengthGroupedBatchIterDataset(grain.IterDataset):
    """Batches of similar-length sequences, padded to the smallest fitting bucket (see module doc).

    parent yields int32 id arrays [L] with L <= max(buckets). Yields ``{"input_ids", "attention_mask"}``
    [batch_size, bucket]. ``drop_remainder=False`` pads the last batch with all-padding rows, and
    ``min_batches`` appends all-padding batches [batch_size, smallest bucket] up to that count.
    ``group_rows`` > 0 sorts and shuffles groups of that many rows instead of whole batches.
    """

    def __init__(
        self,
        parent: grain.IterDataset,
        *,
        batch_size: int,
        buckets: Sequence[int],
        window: int,
        seed: int,
        pad_id: int,
        shuffle: bool = True,
        drop_remainder: bool = True,
        min_batches: int = 0,
        group_rows: int = 0,
    ):
        super().__init__(parent)
        self.batch_size, self.buckets, self.window = batch_size, tuple(sorted(buckets)), window
        self.seed, self.pad_id, self.shuffle, self.drop_remainder = seed, pad_id, shuffle, drop_remainder
        self.min_batches = min_batches
        self.group_rows = group_rows

    def __iter__(self) -> _LengthGroupedIterator:
        return _LengthGroupedIterator(self._parent.__iter__(), self)

    def __str__(self) -> str:
        return f"LengthGroupedBatchIterDataset(batch_size={self.batch_size}, buckets={self.buckets})"


def _as_features(ids: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": ids}


def _packed_batch(packed: dict[str, np.ndarray]) -> Batch:
    """grain's packer output -> the contract's keys (segment 0 = padding)."""
    seg = packed["input_ids_segment_ids"].astype(np.int32)
    return {
        "input_ids": packed["input_ids"].astype(np.int32),
        "attention_mask": (seg > 0).astype(np.int32),
        "segment_ids": seg,
        "position_ids": packed["input_ids_positions"].astype(np.int32),
    }


def _host_slice(n: int, index: int, count: int, even: bool) -> slice:
    """This host's contiguous share of n records; ``even`` gives every host n // count of them so
    hosts of a multi-host run produce the same number of batches and stay in lockstep."""
    if even:
        per = n // count
        return slice(index * per, (index + 1) * per)
    return slice(index * n // count, (index + 1) * n // count)


def make_dataset(
    data: str | os.PathLike | dict,
    split: str = "train",
    cfg: LoaderConfig = LoaderConfig(),
    *,
    train: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.IterDataset:
    """The grain dataset of batches for one split of a prepared data directory.

    data: the directory (or its loaded manifest).
    train=True: shuffled (cfg.shuffle), repeated (cfg.num_epochs), partial batches dropped, an equal
      share of sequences per host (the last ``n mod hosts`` sequences of the split are left out).
      Packed training batches vary in number per epoch between hosts, so a multi-host run with
      packing should count steps (num_epochs=None, the default).
    train=False: one deterministic pass, always length-grouped padded batches (packing only saves
      compute), the last batch padded with empty rows, then all-padding batches so that every host
      yields ceil(ceil(n / hosts) / batch_size) batches and multi-host evaluation stays in step.
    shard_index / shard_count: this host's share; default jax.process_index() / process_count().
    """
    manifest = data if isinstance(data, dict) else manifest_lib.load_manifest(data)
    if shard_index is None or shard_count is None:
        shard_index, shard_count = jax.process_index(), jax.process_count()
    if not 0 <= shard_index < shard_count:
        raise UserError(f"shard_index {shard_index} is not in [0, {shard_count})")
    special = manifest["tokenizer"]["special_ids"]
    pad_id, sep_id = special["pad"], special["sep"]

    source = grain.sources.ArrayRecordDataSource(manifest_lib.split_files(manifest, split))
    n = len(source)
    ds = grain.MapDataset.source(source)[_host_slice(n, shard_index, shard_count, even=train)]
    if len(ds) == 0:
        raise UserError(
            f"the {split!r} split has {n} sequences, too few for {shard_count} processes; use more data"
        )
    if train:
        if cfg.shuffle:
            ds = ds.shuffle(seed=cfg.seed)  # a different permutation each epoch
        ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(DecodeIds(manifest["dtype"], cfg.max_len, sep_id))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=256))
    if cfg.packed and train:
        it = grain.experimental.FirstFitPackIterDataset(
            it.map(_as_features),
            length_struct={"input_ids": cfg.max_len},
            num_packing_bins=max(cfg.pack_bins, cfg.batch_size),
            seed=cfg.seed,
            shuffle_bins=cfg.shuffle,
            padding_struct={"input_ids": pad_id},
        )
        it = it.batch(cfg.batch_size, drop_remainder=True).map(_packed_batch)
    else:
        per_host = -(-n // shard_count)
        it = LengthGroupedBatchIterDataset(
            it,
            batch_size=cfg.batch_size,
            buckets=bucket_lengths(cfg, train=False),
            window=cfg.group_window,
            seed=cfg.seed,
            pad_id=pad_id,
            shuffle=train and cfg.shuffle,
            drop_remainder=train,
            min_batches=0 if train else -(-per_host // cfg.batch_size),
            group_rows=cfg.group_rows if train else 0,
        )
    if cfg.prefetch:
        it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=cfg.prefetch)
    return it


def make_loader(
    data: str | os.PathLike | dict,
    split: str = "train",
    cfg: LoaderConfig = LoaderConfig(),
    *,
    train: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
    """``iter(make_dataset(...))``: a checkpointable iterator of batches (``get_state``/``set_state``)."""
    it = iter(make_dataset(data, split, cfg, train=train, shard_index=shard_index, shard_count=shard_count))
    _LIVE.add(it)
    return it


# grain stops its prefetch threads in DatasetIterator.__del__ -> close(), which at interpreter exit
# can run after module teardown and print tracebacks (grain 0.2.18's ThreadPrefetch close() is not
# idempotent). So close live iterators while modules still exist, then make a later close() a no-op.
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _closed_already() -> None:
    pass


@atexit.register
def _close_live_iterators() -> None:
    for it in list(_LIVE):
        try:
            it.close()
            it.close = _closed_already
        except Exception:  # best effort at exit
            pass


def eval_batches(
    data: str | os.PathLike | dict,
    cfg: LoaderConfig = LoaderConfig(),
    split: str = "validation",
    *,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
    """One deterministic pass over the held-out split (this host's share), fixed batch shapes."""
    return make_loader(data, split, cfg, train=False, shard_index=shard_index, shard_count=shard_count)
