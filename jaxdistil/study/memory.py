"""Memory of a strategy: what each device holds of placed arrays, and the compiler's analysis."""

from __future__ import annotations

import collections
import math
from typing import Any

import jax


def per_device_bytes(tree: Any) -> dict[int, int]:
    """Bytes each device holds of a pytree of placed ``jax.Array`` s: device id -> bytes.

    Sums the actual addressable shards (so replicated arrays count fully on every device, sharded
    ones by their shard shape); non-array leaves count nothing.
    """
    totals: collections.Counter[int] = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        if not isinstance(leaf, jax.Array):
            continue
        itemsize = leaf.dtype.itemsize
        for shard in leaf.addressable_shards:
            totals[shard.device.id] += math.prod(shard.data.shape) * itemsize
    return dict(totals)


def max_device_bytes(tree: Any) -> int:
    """The most bytes of ``tree`` on any one device (what limits the strategy)."""
    return max(per_device_bytes(tree).values(), default=0)


def abstract_device_bytes(tree: Any) -> int:
    """``max_device_bytes`` of a tree of ``jax.ShapeDtypeStruct`` s carrying shardings (nothing
    placed): each leaf's shard on every device, from its sharding's index map."""
    totals: collections.Counter[Any] = collections.Counter()
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            continue
        for device, index in sharding.devices_indices_map(leaf.shape).items():
            shape = [len(range(*s.indices(dim))) for s, dim in zip(index, leaf.shape)]
            totals[device.id] += math.prod(shape) * leaf.dtype.itemsize
    return max(totals.values(), default=0)


MEMORY_FIELDS = ("argument", "output", "alias", "temp", "generated_code")


def memory_analysis(compiled: Any) -> dict[str, int | None]:
    """``compiled.memory_analysis()`` as {argument, output, alias, temp, generated_code} bytes per
    device; None values where the backend does not give an analysis."""
    out: dict[str, int | None] = dict.fromkeys(MEMORY_FIELDS)
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends raise instead of returning None  # noqa: BLE001
        stats = None
    if isinstance(stats, list | tuple):
        stats = stats[0] if stats else None
    if stats is None:
        return out
    for name in MEMORY_FIELDS:
        value = getattr(stats, f"{name}_size_in_bytes", None)
        out[name] = None if value is None else int(value)
    return out


def cost_flops(compiled: Any) -> float | None:
    """FLOPs of one run of the compiled (per-device, SPMD-partitioned) program, or None."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])
