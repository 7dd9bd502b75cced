"""What one step costs each device, read from the compiled program: the time model's inputs.

  FLOPs       the dots of every op (``hlo.op_costs``), by input type (bf16 / f32), loop bodies x
              their trip counts: the matrix units' work
  HBM bytes   what every op reads and writes in device memory (fusion boundaries are where data
              leaves the chip), the same count a per-op roofline uses
  collectives every collective op with its result bytes, executions, group size and the mesh axes
              its groups span (from the replica groups: partition id = position in the mesh's
              flattened device list), and the bytes each device sends on the wire by a ring:
                all-reduce 2 (n-1)/n R   all-gather (n-1)/n R   all-to-all (n-1)/n R
                reduce-scatter (n-1) R   collective-permute R          (R: result bytes per device)
              An all-reduce whose results every device only slices to its n-th (how XLA:CPU lowers a
              reduce-scatter) is also costed as the reduce-scatter GPU and TPU compile it to.
  memory      the compiler's analysis: arguments + temporaries + outputs not aliased to arguments

``step_cost(hlo_text, mesh_sizes, memory)`` builds it; ``jaxdistil.study.predict`` times it.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxdistil.study.hlo import COLLECTIVES, OpCost, collective_stats, op_costs
from jaxdistil.training.sharding import MESH_AXES


def wire_factor(kind: str, n: int) -> float:
    """Bytes a device sends per byte of its result, for a ring collective over n devices."""
    if n < 2:
        return 0.0
    return {"all-reduce": 2.0 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
            "reduce-scatter": float(n - 1), "collective-permute": 1.0}[kind]


def ring_steps(kind: str, n: int) -> int:
    """Sequential steps of the ring algorithm (each pays one hop latency)."""
    if n < 2:
        return 0
    return {"all-reduce": 2 * (n - 1), "collective-permute": 1}.get(kind, n - 1)


def axes_of(groups: Sequence[Sequence[int]] | None, mesh_sizes: Mapping[str, int]) -> tuple[str, ...]:
    """The mesh axes along which the devices of a collective's groups differ (partition id = flat
    position in the mesh, row-major over ``data, fsdp, tensor``); all axes > 1 when groups are not
    given (XLA's empty replica groups mean every device)."""
    names = [a for a in MESH_AXES if a in mesh_sizes]
    shape = [mesh_sizes[a] for a in names]
    if not groups:
        return tuple(a for a in names if mesh_sizes[a] > 1)
    varying: set[int] = set()
    for group in groups:
        coords = np.array([np.unravel_index(p, shape) for p in group])
        varying.update(i for i in range(len(shape)) if len(set(coords[:, i])) > 1)
    return tuple(names[i] for i in sorted(varying))


def axes_label(axes: Sequence[str]) -> str:
    return "+".join(axes) if axes else "none"


@dataclasses.dataclass
class Collective:
    """One collective op: kind, result bytes per execution, executions per step, group size n,
    the mesh axes it spans, its groups (partition ids) and the bytes of its results that devices only
    slice afterwards (XLA:CPU's reduce-scatter)."""

    kind: str
    name: str
    bytes: int
    executions: int
    group_size: int
    axes: tuple[str, ...]
    groups: list[list[int]] | None
    sliced_bytes: int = 0
    op_name: str = ""

    def wire_bytes(self, reduce_scatter: bool = False) -> float:
        """Bytes each device sends per step; ``reduce_scatter``: the sliced part as a reduce-scatter."""
        n = self.group_size
        if reduce_scatter and self.sliced_bytes:
            sliced = self.sliced_bytes
            return self.executions * (wire_factor("all-reduce", n) * (self.bytes - sliced)
                                      + wire_factor("reduce-scatter", n) * sliced / n)
        return self.executions * wire_factor(self.kind, n) * self.bytes


@dataclasses.dataclass
class StepCost:
    """One step on one device (see the module doc). ops: every op; collectives: every collective."""

    mesh_sizes: dict[str, int]
    ops: list[OpCost]
    collectives: list[Collective]
    memory: dict[str, int | None]

    @property
    def devices(self) -> int:
        return int(np.prod(list(self.mesh_sizes.values())))

    @property
    def flops(self) -> float:
        return sum(op.flops * op.executions for op in self.ops)

    def flops_by_dtype(self) -> dict[str, float]:
        out: collections.Counter[str] = collections.Counter()
        for op in self.ops:
            if op.flops:
                out[op.dtype or "?"] += op.flops * op.executions
        return dict(out)

    @property
    def hbm_bytes(self) -> float:
        return float(sum(op.bytes * op.executions for op in self.ops))

    @property
    def needed_bytes(self) -> int | None:
        """Peak device memory the program needs: arguments + temporaries + outputs that do not reuse
        (alias) a donated argument's buffer; None without the compiler's analysis."""
        m = self.memory
        if m.get("argument") is None or m.get("temp") is None:
            return None
        return int(m["argument"] + m["temp"] + max(0, (m.get("output") or 0) - (m.get("alias") or 0)))

    def wire_bytes(self, reduce_scatter: bool = False) -> dict[str, dict[str, float]]:
        """{mesh axes label: {kind: bytes each device sends per step}}."""
        out: dict[str, dict[str, float]] = {}
        for c in self.collectives:
            by_kind = out.setdefault(axes_label(c.axes), dict.fromkeys(COLLECTIVES, 0.0))
            by_kind[c.kind] += c.wire_bytes(reduce_scatter)
        return out

    def summary(self) -> dict[str, Any]:
        """The figures for the study's JSON / CSV."""
        return {
            "flops_per_device": self.flops, "flops_by_dtype": self.flops_by_dtype(),
            "hbm_bytes_per_device": self.hbm_bytes, "needed_bytes_per_device": self.needed_bytes,
            "ops_per_step": sum(op.executions for op in self.ops),
            "collective_wire_bytes": self.wire_bytes(),
            "collective_wire_bytes_as_reduce_scatter": self.wire_bytes(reduce_scatter=True),
        }


def step_cost(hlo_text: str, mesh_sizes: Mapping[str, int], memory: Mapping[str, int | None]) -> StepCost:
    """The StepCost of an optimized HLO module (``compiled.as_text()``) compiled for a mesh of
    ``mesh_sizes`` (``{"data": 2, "fsdp": 4, "tensor": 1}``, in mesh order), with the compiler's
    memory analysis (``study.memory.memory_analysis``)."""
    sizes = {a: int(mesh_sizes[a]) for a in MESH_AXES if a in mesh_sizes}
    stats = collective_stats(hlo_text)
    collectives = [
        Collective(kind=op["kind"], name=op["name"], bytes=op["bytes"], executions=op["executions"],
                   group_size=op["group_size"] or int(np.prod(list(sizes.values()))),
                   axes=axes_of(op["groups"], sizes), groups=op["groups"], sliced_bytes=op["sliced_bytes"],
                   op_name=op["op_name"])
        for op in stats.ops if op["executions"]
    ]
    return StepCost(sizes, op_costs(hlo_text), collectives, dict(memory))
