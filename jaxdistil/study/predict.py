"""Step time on an accelerator the study did not run on, from the compiled program: ``roofline-v1``.

Inputs: the step's ``StepCost`` (``jaxdistil.study.cost``: every op's dot FLOPs and memory bytes,
every collective's bytes, group and mesh axes, the memory the program needs), a ``Target``
(``jaxdistil.study.hardware``: a chip's published rates, a device count and its topology), the
tokens per step and the model FLOPs per step (``jaxdistil.models.flops``, the MFU numerator).

The model, named in every prediction (``MODEL``):

  compute     a roofline per op of the program: an op takes max(dot FLOPs / matmul peak for its
              inputs' type, bytes / HBM bandwidth); the step's compute is the sum over ops (ops run
              one after another on a device). Ops whose FLOP term wins are "matmul-bound", the
              others "HBM-bound". The program is XLA:CPU's, so two of its CPU-only habits are undone
              for GPU and TPU targets: the rolled loops in which it draws random bits (dropout,
              masking) count as one pass writing the bits, and all-reduces it uses for a
              reduce-scatter count as reduce-scatters (see collectives). On the calibrated ``cpu``
              the runtime's first touch of the memory it allocates at every execution
              (temporaries, outputs) adds bytes / first-touch rate.
  fused       a lower bound on compute for a compiler that fuses every elementwise op into the
              matmuls around it: the ops with dots alone (their rooflines as above) plus the step's
              arguments read and outputs written once (``step_s_fused``, ``mfu_fused``). XLA:CPU
              fuses less than XLA:GPU and XLA:TPU, so the real step lies between the two.
  collectives each collective takes ring steps x hop latency + wire bytes / B, where the wire bytes
              are the ring algorithm's (``cost.wire_factor``) and B the bandwidth per direction of
              the links its group spans on the target (``hardware.Slice.bandwidth``: NVLink or
              InfiniBand, the ICI links of the torus dims the mesh axis is laid on). Collectives run
              one after another. On GPU and TPU targets an all-reduce that XLA:CPU used for a
              reduce-scatter (its results only sliced afterwards) is timed as the reduce-scatter the
              accelerator's compiler makes of it.
  overlap     the step lies between full overlap of compute and collectives, max(compute,
              collectives) (``step_s_overlap``, optimistic), and none, compute + collectives
              (``step_s_serial``, pessimistic); tokens/s and MFU are given for both.
  memory      the program's arguments + temporaries + unaliased outputs against the chip's HBM.
  bound       what the step waits on most: "compute" (matmul-bound ops), "HBM" (memory-bound ops)
              or "collectives (<axes>)" when collectives take longer than compute.

What it leaves out (docs/sharding-study.md): kernels reach less than peak (real MFU is lower than a
roofline's); launch overheads; contention between concurrent collectives; the accelerator
compiler's own buffer plan (the CPU's stands in for it).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxdistil.study.cost import StepCost, axes_label, ring_steps
from jaxdistil.study.hardware import Target

MODEL = "roofline-v1"
MODEL_DESCRIPTION = (
    "roofline-v1: per-op roofline of the compiled program (max(dot FLOPs / matmul peak of the input type, "
    "bytes / HBM bandwidth), summed over ops; XLA:CPU's rolled random-bits loops as one pass on GPU/TPU) + ring "
    "collectives on the links each group's mesh axes span (all-reduce 2(n-1)/n, all-gather and all-to-all "
    "(n-1)/n, reduce-scatter (n-1), permute 1 times the result bytes, per direction, plus hop latency; "
    "XLA:CPU's all-reduce+slice as reduce-scatter on GPU/TPU); step time bounds: full overlap max(compute, "
    "collectives), no overlap compute + collectives; fused: the dot ops alone (every elementwise op fused)")
DTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "bf16"}


@dataclasses.dataclass
class Prediction:
    """One mesh on one target. Times in seconds per step; bytes per device.

    refused: why no prediction was made (a device count that does not match the target); the other
    figures are then None.
    """

    target: str
    chip: str
    model: str
    devices: int
    layout: str = ""
    refused: str | None = None
    matmul_s: float | None = None
    memory_s: float | None = None
    alloc_s: float | None = None
    compute_s: float | None = None
    collective_s: float | None = None
    collective_by_axes: dict[str, float] = dataclasses.field(default_factory=dict)
    links: dict[str, str] = dataclasses.field(default_factory=dict)
    step_s_overlap: float | None = None
    step_s_serial: float | None = None
    compute_fused_s: float | None = None
    step_s_fused: float | None = None
    mfu_fused: float | None = None
    tokens_per_s_overlap: float | None = None
    tokens_per_s_serial: float | None = None
    mfu_overlap: float | None = None
    mfu_serial: float | None = None
    needed_bytes: int | None = None
    capacity_bytes: float | None = None
    fits: bool | None = None
    bound: str = ""
    notes: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self, prefix: str) -> dict[str, Any]:
        """The CSV columns of this prediction, ``<prefix>_...``."""
        keys = ("step_s_overlap", "step_s_serial", "step_s_fused", "tokens_per_s_overlap", "tokens_per_s_serial",
                "mfu_overlap", "mfu_serial", "mfu_fused", "compute_s", "compute_fused_s", "collective_s",
                "needed_bytes", "fits", "bound", "model", "refused")
        return {f"{prefix}_{k}": getattr(self, k) for k in keys}


def predict(cost: StepCost, target: Target, tokens_per_step: int, model_flops_per_step: float,
            compute_dtype: str = "float32") -> Prediction:
    """Times ``cost`` (one step of a mesh) on ``target`` (see the module doc).

    model_flops_per_step: the whole step's model FLOPs over all devices (``train_flops_per_token``
    x tokens), MFU's numerator; MFU's denominator is devices x the chip's matmul peak for the step's
    compute dtype (bf16, or f32 at JAX's default precision).
    """
    chip = target.chip
    n = cost.devices
    out = Prediction(target=target.label, chip=chip.name, model=MODEL, devices=n)
    refused = target.check_devices(n)
    if refused:
        out.refused = refused
        return out
    layout = target.slice_for(cost.mesh_sizes)
    out.layout = layout.describe()
    share = n if chip.family == "cpu" else 1  # host devices run at once on the same cores

    accelerator = chip.family in ("gpu", "tpu")
    skip = "cpu" if accelerator else "accelerator"  # XLA:CPU's rolled random-bits loops, or their fused pass
    matmul_s = memory_s = fused_s = 0.0
    rng_loops = 0
    for op in cost.ops:
        if op.backend == skip:
            continue
        rng_loops += op.backend == "accelerator"
        t_flops = op.flops * share / chip.peak(op.dtype) if op.flops else 0.0
        t_bytes = op.bytes * share / chip.hbm_bytes_per_s
        if t_flops >= t_bytes:
            matmul_s += op.executions * t_flops
        else:
            memory_s += op.executions * t_bytes
        if op.flops:
            fused_s += op.executions * max(t_flops, t_bytes)
    m = cost.memory
    unaliased = max(0, (m.get("output") or 0) - (m.get("alias") or 0))
    alloc_s = 0.0
    if chip.alloc_bytes_per_s:
        alloc_s = ((m.get("temp") or 0) + unaliased) * share / chip.alloc_bytes_per_s
    compute_s = matmul_s + memory_s + alloc_s
    # The fused bound: only the ops with dots, the step's arguments read and its outputs written once.
    fused_s += ((m.get("argument") or 0) + (m.get("output") or 0)) * share / chip.hbm_bytes_per_s

    by_axes: dict[str, float] = {}
    links: dict[str, str] = {}
    sliced = 0
    for c in cost.collectives:
        bandwidth, latency, link = math.inf, 0.0, "none"
        for group in c.groups or [list(range(n))]:
            b, lat, name = layout.bandwidth(group)
            if b < bandwidth:
                bandwidth, latency, link = b, lat, name
        if not math.isfinite(bandwidth):
            continue  # groups of one device: nothing moves
        wire = c.wire_bytes(reduce_scatter=accelerator)
        sliced += bool(accelerator and c.sliced_bytes)
        t = c.executions * ring_steps(c.kind, c.group_size) * latency + wire / bandwidth
        key = axes_label(c.axes)
        by_axes[key] = by_axes.get(key, 0.0) + t
        links[key] = link
    collective_s = sum(by_axes.values())
    if rng_loops:
        out.notes.append(f"{rng_loops} rolled random-bits loop(s) (XLA:CPU's threefry) costed as one pass writing "
                         "their bits, as GPU and TPU unroll and fuse them")
    if sliced:
        out.notes.append(f"{sliced} all-reduce(s) whose results are only sliced (XLA:CPU's reduce-scatter) timed as "
                         "reduce-scatters")

    overlap, serial = max(compute_s, collective_s), compute_s + collective_s
    fused = max(fused_s, collective_s)
    peak = chip.peak(DTYPES.get(compute_dtype, "f32")) / share * n
    out.matmul_s, out.memory_s, out.alloc_s, out.compute_s = matmul_s, memory_s, alloc_s, compute_s
    out.compute_fused_s, out.step_s_fused = fused_s, fused
    out.collective_s, out.collective_by_axes, out.links = collective_s, by_axes, links
    out.step_s_overlap, out.step_s_serial = overlap, serial
    if overlap > 0:
        out.tokens_per_s_overlap, out.tokens_per_s_serial = tokens_per_step / overlap, tokens_per_step / serial
        out.mfu_overlap, out.mfu_serial = model_flops_per_step / overlap / peak, model_flops_per_step / serial / peak
        out.mfu_fused = model_flops_per_step / fused / peak
    out.needed_bytes = cost.needed_bytes
    out.capacity_bytes = chip.hbm_bytes / share
    if out.needed_bytes is not None and out.capacity_bytes:
        out.fits = out.needed_bytes <= out.capacity_bytes
        if not out.fits:
            out.notes.append(f"does not fit: needs {out.needed_bytes / 2**30:.1f} GiB per device, "
                             f"{chip.name} has {out.capacity_bytes / 2**30:.1f} GiB")
        elif chip.family == "gpu" and out.needed_bytes > 0.75 * out.capacity_bytes:
            out.notes.append("needs more than the 75% of GPU memory JAX preallocates by default: "
                             "set XLA_PYTHON_CLIENT_MEM_FRACTION=.95")
    if collective_s > compute_s:
        out.bound = f"collectives ({max(by_axes, key=by_axes.get)})"
    else:
        out.bound = "compute" if matmul_s >= memory_s + alloc_s else "HBM"
    return out


def predict_all(cost: StepCost, targets: list[Target], tokens_per_step: int, model_flops_per_step: float,
                compute_dtype: str) -> list[Prediction]:
    return [predict(cost, t, tokens_per_step, model_flops_per_step, compute_dtype) for t in targets]


def fmt_range(low: float | None, high: float | None, scale: float = 1.0, digits: int = 3) -> str:
    """'a–b' (both scaled, 3 significant digits), 'a' when equal, 'n/a' when missing."""
    if low is None or high is None:
        return "n/a"
    a, b = f"{low * scale:.{digits}g}", f"{high * scale:.{digits}g}"
    return a if a == b else f"{a}–{b}"


def hardware_meta(targets: list[Target]) -> dict[str, Any]:
    """The figures each prediction used (for the study's JSON)."""
    return {t.label: {"devices": t.devices, **t.chip.to_json()} for t in targets}
