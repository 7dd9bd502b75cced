"""The accelerators the shard study predicts for: peak rates, memory, interconnect, and their names.

A *target* is a chip and a device count: ``jaxdistil shard-study --predict H100,v5p-16,cpu``.

  GPU nodes   ``H100``, ``H200``, ``A100`` (SXM parts) with an optional ``xN``: ``H100x16`` is 16 GPUs
              in nodes of 8 (one NVLink/NVSwitch domain each) joined by InfiniBand, one NIC per GPU.
  TPU slices  Cloud TPU's accelerator types: ``v4-N`` and ``v5p-N`` count TensorCores (2 per chip, one
              JAX device per chip: ``v5p-16`` is 8 chips), ``v5e-N`` (alias ``v5litepod-N``) and
              ``v6e-N`` count chips. The slice's torus is the documented shape (``v5p-16``: 2x2x2).
  cpu         this machine, calibrated when asked for (``calibrate_cpu``): its host devices share
              its cores and memory.

A name without a count (``H100``, ``v5p``, ``cpu``) takes as many devices as the mesh has; a name with
a count must match the compiled mesh's device count, or the prediction is refused for that mesh
(``check_devices``): the study never extrapolates a program to a device count it did not compile.
Names are case-insensitive and ignore ``-``/``_``/spaces inside the chip name (``h100-sxm``).

Every figure below is a vendor's published peak (dense, no sparsity) or derived from one, with its
source; what is not published is said so, with what is assumed. Rates are per chip; link bandwidths
are per direction. The time model that uses them is ``jaxdistil.study.predict``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from jaxdistil.errors import UserError

GB = 1e9
GIB = 2.0**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator's published figures (per chip; bandwidths per direction).

    matmul_flops: dense peak of the matrix units by the dots' input type: "bf16", and "f32" for
      float32 inputs at JAX's default precision (TF32 tensor cores on A100/H100/H200, one bfloat16
      pass on TPU: https://docs.jax.dev/en/latest/201/precision.html). vector_f32_flops: the
      non-tensor float32 peak (for the record; the model's dots use matmul_flops).
    fabric: "nvswitch" (every GPU of a node reaches every other at ``link_bytes_per_s``),
      "torus" (TPU ICI: ``ports`` links of ``link_bytes_per_s`` to the neighbours of a
      ``torus_dims``-D torus) or "host" (CPU host devices sharing one memory).
    node_devices / network_bytes_per_s: GPUs per NVLink domain and each GPU's InfiniBand bandwidth
      to other nodes. cores_per_chip: TensorCores a TPU accelerator-type name counts per chip.
    wrap_min_chips: slices with at least this many chips have wraparound links (a torus); smaller
      ones are a mesh. pod_chips: the largest slice the name may ask for.
    hop_latency_s: per step of a ring collective (NOT published anywhere; an assumed order of
      magnitude, it only matters for many small collectives).
    alloc_bytes_per_s: only the calibrated CPU: the rate at which the runtime's fresh buffers are
      first touched (page faults of its per-execution allocations); accelerators allocate once.
    """

    name: str
    family: str
    matmul_flops: Mapping[str, float]
    vector_f32_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: float
    fabric: str
    link_bytes_per_s: float
    ports: int = 1
    torus_dims: int = 0
    node_devices: int = 0
    network_bytes_per_s: float = 0.0
    cores_per_chip: int = 1
    wrap_min_chips: int = 0
    pod_chips: int = 0
    hop_latency_s: float = 1e-6
    network_hop_latency_s: float = 5e-6
    alloc_bytes_per_s: float | None = None
    source: str = ""

    def peak(self, dtype: str) -> float:
        """Matmul peak for dots with inputs of ``dtype`` ("bf16", "f32"; others as bf16)."""
        return self.matmul_flops.get(dtype, self.matmul_flops["bf16"])

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

CHIPS: dict[str, Chip] = {
    # NVIDIA H100 SXM5 80GB. Datasheet (https://www.nvidia.com/en-us/data-center/h100/, "H100 SXM"
    # column; tensor figures are "shown with sparsity, 1/2 lower without"): BF16 tensor 1,979 ->
    # 989.5 TFLOPS dense; TF32 tensor 989 -> 494.5 dense; FP32 67 TFLOPS; GPU memory 80 GB (as
    # published, 1e9 bytes; the usable capacity is slightly larger), 3.35 TB/s; NVLink 900 GB/s
    # (bidirectional: 18 links x 50 GB/s) -> 450 GB/s per direction, through NVSwitch to any GPU of
    # the 8 of an HGX/DGX node. Between nodes: DGX H100 has 8 ConnectX-7 400 Gb/s InfiniBand NICs,
    # one per GPU (rail-optimised fabric: https://docs.nvidia.com/reference-architectures/
    # hgx-ai-factory-h100-h200-b200/network-logical-architecture.md) -> 50 GB/s per GPU per direction.
    "h100": Chip(
        name="H100 SXM", family="gpu", matmul_flops={"bf16": 989.5e12, "f32": 494.5e12}, vector_f32_flops=67e12,
        hbm_bytes_per_s=3.35e12, hbm_bytes=80 * GB, fabric="nvswitch", link_bytes_per_s=450 * GB,
        node_devices=8, network_bytes_per_s=50 * GB,
        source="nvidia.com/en-us/data-center/h100 (datasheet, H100 SXM); DGX H100: 8x ConnectX-7 400 Gb/s"),
    # NVIDIA H200 SXM 141GB. Datasheet (https://www.nvidia.com/en-us/data-center/h200/, "H200 SXM"):
    # the same GH100 compute as H100 SXM (BF16 1,979 / TF32 989 with sparsity -> 989.5 / 494.5
    # dense; FP32 67 TFLOPS), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional. DGX/HGX H200
    # nodes: 8 GPUs, 8 ConnectX-7 400 Gb/s NICs (one per GPU) -> 50 GB/s per direction.
    "h200": Chip(
        name="H200 SXM", family="gpu", matmul_flops={"bf16": 989.5e12, "f32": 494.5e12}, vector_f32_flops=67e12,
        hbm_bytes_per_s=4.8e12, hbm_bytes=141 * GB, fabric="nvswitch", link_bytes_per_s=450 * GB,
        node_devices=8, network_bytes_per_s=50 * GB,
        source="nvidia.com/en-us/data-center/h200 (datasheet, H200 SXM); DGX H200: 8x ConnectX-7 400 Gb/s"),
    # NVIDIA A100 80GB SXM4. Datasheet (nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16
    # tensor 312 TFLOPS dense (624 sparse), TF32 156 dense, FP32 19.5; 80 GB HBM2e at 2,039 GB/s;
    # NVLink (3rd gen, 12 links) 600 GB/s bidirectional -> 300 GB/s per direction via NVSwitch, 8 per
    # HGX/DGX node. DGX A100: 8 single-port ConnectX-6 200 Gb/s HDR InfiniBand NICs for the compute
    # fabric, one per GPU -> 25 GB/s per direction.
    "a100": Chip(
        name="A100 80GB SXM", family="gpu", matmul_flops={"bf16": 312e12, "f32": 156e12}, vector_f32_flops=19.5e12,
        hbm_bytes_per_s=2.039e12, hbm_bytes=80 * GB, fabric="nvswitch", link_bytes_per_s=300 * GB,
        node_devices=8, network_bytes_per_s=25 * GB,
        source="NVIDIA A100 datasheet (A100 80GB SXM); DGX A100: 8x ConnectX-6 200 Gb/s HDR"),
    # Cloud TPU v4 (https://cloud.google.com/tpu/docs/v4): 275 TFLOPS bf16 per chip, 32 GiB HBM2 at
    # 1,200 GB/s, two TensorCores per chip (v4-8 = 4 chips), 3D mesh that is a torus for slices of
    # whole 4x4x4 cubes, 4,096-chip pods. ICI bandwidth per chip is NOT on that page: derived from its
    # "all-reduce bandwidth per Pod 1.1 PB/s" / 4,096 chips = 269 GB/s per chip per direction (the
    # same derivation gives exactly half the published bidirectional per-chip ICI figure for v5e
    # (51.2 TB/s / 256 = 200 of 400 GB/s) and v6e (102.4 TB/s / 256 = 400 of 800 GB/s)), over 6 ports
    # (two neighbours in each of 3 dimensions) -> 44.8 GB/s per link per direction. float32 dots at
    # JAX's default precision run as one bf16 pass: the bf16 rate (no fp32 matmul peak is published).
    "v4": Chip(
        name="TPU v4", family="tpu", matmul_flops={"bf16": 275e12, "f32": 275e12}, vector_f32_flops=0.0,
        hbm_bytes_per_s=1200 * GB, hbm_bytes=32 * GIB, fabric="torus", link_bytes_per_s=1.1e15 / 4096 / 6,
        ports=6, torus_dims=3, cores_per_chip=2, wrap_min_chips=64, pod_chips=4096,
        source="cloud.google.com/tpu/docs/v4 (ICI per link derived from the pod's all-reduce bandwidth)"),
    # Cloud TPU v5p (https://cloud.google.com/tpu/docs/v5p): 459 TFLOPS bf16 per chip, 95 GiB HBM2e
    # at 2,765 GB/s, bidirectional ICI 1,200 GB/s per chip (the older page: "4800 Gbps", the same
    # 600 GB/s per direction), 3D torus -> 6 ports (assumed from the 3D torus: two neighbours per
    # dimension) of 100 GB/s per direction. Two TensorCores per chip (v5p-16 = 8 chips, 2x2x2);
    # wraparound for slices of whole 4x4x4 cubes (the page's cube-based shapes); 8,960-chip pods.
    "v5p": Chip(
        name="TPU v5p", family="tpu", matmul_flops={"bf16": 459e12, "f32": 459e12}, vector_f32_flops=0.0,
        hbm_bytes_per_s=2765 * GB, hbm_bytes=95 * GIB, fabric="torus", link_bytes_per_s=1200 * GB / 2 / 6,
        ports=6, torus_dims=3, cores_per_chip=2, wrap_min_chips=64, pod_chips=8960,
        source="cloud.google.com/tpu/docs/v5p"),
    # Cloud TPU v5e (https://cloud.google.com/tpu/docs/v5e): 197 TFLOPS bf16 per chip, 16 GB HBM2 at
    # 819 GB/s, bidirectional ICI 400 GB/s per chip over 4 ports (2D torus) -> 50 GB/s per link per
    # direction; one TensorCore per chip (v5litepod-16 = 16 chips); 256-chip pods. Wraparound: the page
    # calls the pod a 2D torus; we assume only the full 16x16 pod has the wraparound links.
    "v5e": Chip(
        name="TPU v5e", family="tpu", matmul_flops={"bf16": 197e12, "f32": 197e12}, vector_f32_flops=0.0,
        hbm_bytes_per_s=819 * GB, hbm_bytes=16 * GB, fabric="torus", link_bytes_per_s=400 * GB / 2 / 4,
        ports=4, torus_dims=2, cores_per_chip=1, wrap_min_chips=256, pod_chips=256,
        source="cloud.google.com/tpu/docs/v5e"),
    # Cloud TPU v6e / Trillium (https://cloud.google.com/tpu/docs/v6e): 918 TFLOPS bf16 per chip,
    # 32 GB HBM at 1,640 GB/s (an earlier page version: 1,600), bidirectional ICI 800 GB/s per chip
    # (an earlier version: "3584 Gbps") over 4 ports (2D torus) -> 100 GB/s per link per direction;
    # one TensorCore per chip; 256-chip pods; wraparound assumed only on the full 16x16 pod.
    "v6e": Chip(
        name="TPU v6e", family="tpu", matmul_flops={"bf16": 918e12, "f32": 918e12}, vector_f32_flops=0.0,
        hbm_bytes_per_s=1640 * GB, hbm_bytes=32 * GB, fabric="torus", link_bytes_per_s=800 * GB / 2 / 4,
        ports=4, torus_dims=2, cores_per_chip=1, wrap_min_chips=256, pod_chips=256,
        source="cloud.google.com/tpu/docs/v6e"),
}
ALIASES = {"h100sxm": "h100", "h100sxm5": "h100", "h200sxm": "h200", "a100sxm": "a100", "a10080gb": "a100",
           "a10080gbsxm": "a100", "v5litepod": "v5e", "trillium": "v6e", "tpuv4": "v4", "tpuv5p": "v5p",
           "tpuv5e": "v5e", "tpuv6e": "v6e"}
NAMES_HELP = ("H100, H200, A100 (optionally xN GPUs, e.g. H100x16), v4-N / v5p-N (N TensorCores, 2 per chip), "
              "v5e-N / v6e-N (N chips), cpu")


# --------------------------------------------------------------------------------------------------
# Targets: a chip and a device count
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """A chip and a device count (None: the compiled mesh's). label: the name as written, normalised."""

    chip: Chip
    devices: int | None
    label: str

    def check_devices(self, mesh_devices: int) -> str | None:
        """None when a mesh of ``mesh_devices`` devices maps onto this target, else why not (one line)."""
        if self.devices is None or self.devices == mesh_devices:
            if self.chip.family == "tpu" and self.chip.pod_chips and mesh_devices > self.chip.pod_chips:
                return f"{self.label}: {mesh_devices} chips exceed a {self.chip.name} pod ({self.chip.pod_chips})"
            return None
        return (f"{self.label} has {self.devices} devices but the mesh has {mesh_devices}: compile the mesh on "
                f"{self.devices} devices (--host-devices {self.devices}) to predict it; not extrapolated")

    def slice_for(self, mesh_sizes: Mapping[str, int]) -> Slice:
        """The devices of this target laid out for a mesh (``{"data": 2, "fsdp": 4, "tensor": 1}``, in
        mesh order)."""
        n = math.prod(mesh_sizes.values())
        if self.chip.family == "tpu":
            return Slice(self, n, torus_shape(n, self.chip.torus_dims), mesh_sizes)
        return Slice(self, n, (), mesh_sizes)


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def parse_target(text: str, cpu: Chip | None = None) -> Target:
    """One target name (see the module doc) -> Target; a one-line UserError for anything else.

    cpu: the calibrated CPU chip (``calibrate_cpu``) for the name ``cpu``; without it a placeholder
    that ``calibrate_cpu`` replaces."""
    raw = text.strip()
    if not raw:
        raise UserError(f"--predict has an empty name; give targets such as H100,v5p-16 ({NAMES_HELP})")
    low = raw.lower().replace(" ", "")
    if low == "cpu":
        return Target(cpu or CPU_PLACEHOLDER, None, "cpu")
    found = re.fullmatch(r"(v\d+[a-z]*|tpuv\d+[a-z]*|v5litepod|trillium)(?:-(\d+))?", low)
    if found:
        key = ALIASES.get(found.group(1), found.group(1))
        chip = CHIPS.get(key)
        if chip is None or chip.family != "tpu":
            raise UserError(f"--predict {raw!r}: unknown TPU generation {found.group(1)!r}; known: v4, v5p, v5e, v6e "
                            f"(e.g. v5p-16)")
        if found.group(2) is None:
            return Target(chip, None, key)
        count = int(found.group(2))
        per_chip = chip.cores_per_chip
        what = "TensorCores (2 per chip)" if per_chip == 2 else "chips"
        if count < per_chip or count % per_chip:
            raise UserError(f"--predict {raw!r}: {key}-N counts {what}, so N must be a multiple of {per_chip}; "
                            f"e.g. {key}-{8 * per_chip}")
        chips = count // per_chip
        if chips & (chips - 1) or chips > chip.pod_chips:
            raise UserError(f"--predict {raw!r}: {chips} chips is not a power-of-two slice of at most "
                            f"{chip.pod_chips} chips (a {chip.name} pod); e.g. {key}-{8 * per_chip}")
        return Target(chip, chips, f"{key}-{count}")
    found = re.fullmatch(r"([a-z0-9\-_]+?)(?:x(\d+))?", low)
    key = ALIASES.get(_normalise(found.group(1)), _normalise(found.group(1))) if found else ""
    if found and key in CHIPS and CHIPS[key].family == "gpu":
        count = int(found.group(2)) if found.group(2) else None
        if count is not None and count < 1:
            raise UserError(f"--predict {raw!r}: the GPU count after 'x' must be >= 1, e.g. H100x8")
        label = key.upper() + (f"x{count}" if count else "")
        return Target(CHIPS[key], count, label)
    raise UserError(f"--predict {raw!r}: unknown accelerator; known: {NAMES_HELP}")


def parse_targets(text: str, cpu: Chip | None = None) -> list[Target]:
    """``"H100,v5p-16"`` -> targets, in order, each once (one-line UserError naming a bad one)."""
    targets = [parse_target(part, cpu) for part in text.split(",")]
    labels = [t.label for t in targets]
    for label in labels:
        if labels.count(label) > 1:
            raise UserError(f"--predict names {label} twice; list each target once")
    return targets


# --------------------------------------------------------------------------------------------------
# Topology: where the mesh's devices sit, and what bandwidth a group of them has
# --------------------------------------------------------------------------------------------------


def torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU documents for ``chips`` chips: powers of two as even as possible,
    ascending (3D: 8 -> 2x2x2, 32 -> 2x4x4, 64 -> 4x4x4; 2D: 8 -> 2x4, 16 -> 4x4, 256 -> 16x16)."""
    shape = [1] * dims
    n = chips
    while n > 1:
        shape[shape.index(min(shape))] *= 2
        n //= 2
    return tuple(sorted(shape))


def _place(mesh_sizes: Sequence[int], shape: Sequence[int]) -> list[list[tuple[int, int, int]]]:
    """Mesh axes -> torus factors: for each mesh axis, [(physical dim, factor, stride)], so that mesh
    coordinate c of the axis sits at physical coordinate ... + (c_part * stride) in those dims.

    The innermost mesh axis (``tensor``, last) takes the first free factors of the physical dims in
    order, then ``fsdp``, then ``data``, each taking whole dims where they fit: the contiguous
    rings ``jax.experimental.mesh_utils.create_device_mesh`` builds on a TPU slice."""
    free = list(shape)
    used = [1] * len(shape)  # the stride already taken in each dim
    out: list[list[tuple[int, int, int]]] = [[] for _ in mesh_sizes]
    for axis in reversed(range(len(mesh_sizes))):
        need = mesh_sizes[axis]
        for dim in range(len(shape)):
            if need == 1:
                break
            take = math.gcd(need, free[dim])
            if take > 1:
                out[axis].append((dim, take, used[dim]))
                used[dim] *= take
                free[dim] //= take
                need //= take
        if need != 1:
            raise UserError(f"mesh sizes {list(mesh_sizes)} do not tile a {'x'.join(map(str, shape))} torus")
    return out


@dataclasses.dataclass(frozen=True)
class Slice:
    """A target's devices laid out for one mesh: which link a group of mesh positions talks over.

    mesh_sizes: the mesh axes and sizes, in mesh order (``data``, ``fsdp``, ``tensor``); the mesh's
    flat position i (row-major, the partition id XLA's replica groups name) is device i.
      GPU: devices fill nodes of ``node_devices`` in order; a group inside one node uses NVLink, a
        group spanning nodes InfiniBand (each GPU's own NIC: a ring crosses nodes on every rail).
      TPU: the mesh axes are placed on the torus (``_place``); a group's bandwidth is the sum over
        the physical dims it spans of one link per direction, two when it spans a whole dim that has
        wraparound links (a ring can then run both ways round).
      CPU: host devices share one memory: a group copies at the memory rate split over the mesh's
        devices (they all copy at once).
    """

    target: Target
    devices: int
    shape: tuple[int, ...]
    mesh_sizes: Mapping[str, int]

    @property
    def chip(self) -> Chip:
        return self.target.chip

    def describe(self) -> str:
        chip = self.chip
        if chip.family == "tpu":
            wrap = self.devices >= chip.wrap_min_chips
            return f"{self.devices} chips as {'x'.join(map(str, self.shape))} ({'torus' if wrap else 'no wraparound'})"
        if chip.family == "gpu":
            nodes = -(-self.devices // chip.node_devices)
            return f"{self.devices} GPUs in {nodes} node{'s' if nodes > 1 else ''} of {chip.node_devices}"
        return f"{self.devices} host device{'s' if self.devices > 1 else ''} sharing this machine"

    @functools.cached_property
    def _placement(self) -> list[list[tuple[int, int, int]]]:
        return _place(list(self.mesh_sizes.values()), self.shape)

    def _coords(self, position: int) -> tuple[int, ...]:
        """Physical torus coordinates of the mesh's flat position."""
        sizes = list(self.mesh_sizes.values())  # in mesh order (data, fsdp, tensor)
        mesh_coords = []
        rest = position
        for size in reversed(sizes):
            mesh_coords.append(rest % size)
            rest //= size
        mesh_coords.reverse()
        coords = [0] * len(self.shape)
        for axis, parts in enumerate(self._placement):
            c = mesh_coords[axis]
            for dim, factor, stride in parts:
                coords[dim] += (c % factor) * stride
                c //= factor
        return tuple(coords)

    def bandwidth(self, group: Sequence[int]) -> tuple[float, float, str]:
        """(bytes/s per direction per device, latency per ring step, which links) of a group of
        mesh positions."""
        chip = self.chip
        if len(group) < 2:
            return math.inf, 0.0, "none"
        if chip.family == "gpu":
            nodes = {p // chip.node_devices for p in group}
            if len(nodes) == 1:
                return chip.link_bytes_per_s, chip.hop_latency_s, "NVLink"
            return chip.network_bytes_per_s, chip.network_hop_latency_s, "InfiniBand"
        if chip.family == "tpu":
            coords = [self._coords(p) for p in group]
            wrap = self.devices >= chip.wrap_min_chips
            links = 0
            for dim, size in enumerate(self.shape):
                extent = len({c[dim] for c in coords})
                if extent > 1:
                    links += 2 if (wrap and extent == size and size > 2) else 1
            return links * chip.link_bytes_per_s, chip.hop_latency_s, f"ICI x{links}"
        return chip.link_bytes_per_s / max(self.devices, 1), 0.0, "host memory"


# --------------------------------------------------------------------------------------------------
# The CPU, calibrated on the running machine
# --------------------------------------------------------------------------------------------------

CPU_PLACEHOLDER = Chip(name="cpu (not calibrated)", family="cpu", matmul_flops={"bf16": 1.0, "f32": 1.0},
                       vector_f32_flops=0.0, hbm_bytes_per_s=1.0, hbm_bytes=0.0, fabric="host", link_bytes_per_s=1.0)


def _mean_time(fn: Any, state: Any, seconds: float) -> tuple[float, Any]:
    """Mean seconds per call of ``state = fn(state)`` over at least ``seconds`` (after one warm-up
    call): a rate over a window as long as a step, so that it sees the same competition for the
    cores a step does on a shared machine (a best-of-short-runs rate would not)."""
    import jax

    state = jax.block_until_ready(fn(state))
    calls, start = 0, time.perf_counter()
    while True:
        state = jax.block_until_ready(fn(state))
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return elapsed / calls, state


@dataclasses.dataclass(frozen=True)
class CpuRates:
    """What ``measure_cpu`` found: matmul FLOP/s by input type, memory bytes/s (an in-place update
    read and written), and bytes/s of fresh memory first touched (the allocator's page faults)."""

    matmul_f32: float
    matmul_bf16: float
    memory: float
    alloc: float


def measure_cpu(device: Any = None, n: int = 1024, elements: int = 1 << 25, seconds: float = 0.25) -> CpuRates:
    """Measures this machine's rates on one host device, each as a mean over ``seconds`` of
    repeated calls (about 1 s in all):

      matmul   an [n, n] x [n, n] dot in float32, and one of [n/2, n/2] in bfloat16 (2 n^3 FLOPs);
      memory   ``x * a + b`` over ``elements`` float32 in place (a donated buffer: 8 bytes per element);
      alloc    the same into a fresh buffer, minus the in-place time: what XLA:CPU pays to touch
               memory it has just allocated (it allocates its temporaries at every execution).
    """
    import jax
    import jax.numpy as jnp

    device = device or jax.devices("cpu")[0]
    rates = {}
    for dtype, size in ((jnp.float32, n), (jnp.bfloat16, n // 2)):
        a = jax.device_put(jnp.ones((size, size), dtype) / size, device)
        per_call, _ = _mean_time(jax.jit(lambda x: x @ x), a, seconds)
        rates[dtype] = 2.0 * size**3 / per_call
    x = jax.device_put(jnp.ones((elements,), jnp.float32), device)
    in_place, x = _mean_time(jax.jit(lambda v: v * 1.0001 + 1.0, donate_argnums=0), x, seconds)
    fresh, _ = _mean_time(jax.jit(lambda v: v * 1.0001 + 1.0), x, seconds)
    nbytes = 4.0 * elements
    return CpuRates(rates[jnp.float32], rates[jnp.bfloat16], 2 * nbytes / in_place,
                    nbytes / max(fresh - in_place, 1e-3 * fresh))


def cpu_chip(rates: CpuRates) -> Chip:
    """The ``cpu`` row of the table from measured rates: the whole machine's. A mesh of n host
    devices shares it: the time model gives each device 1/n of every rate and of the memory."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 0
    return Chip(
        name="cpu (calibrated)", family="cpu",
        matmul_flops={"bf16": rates.matmul_bf16, "f32": rates.matmul_f32}, vector_f32_flops=0.0,
        hbm_bytes_per_s=rates.memory, hbm_bytes=float(ram), fabric="host", link_bytes_per_s=rates.memory,
        hop_latency_s=0.0, network_hop_latency_s=0.0, alloc_bytes_per_s=rates.alloc,
        source=(f"measured here: matmul {rates.matmul_f32 / 1e9:.1f} GFLOP/s f32, {rates.matmul_bf16 / 1e9:.1f} bf16; "
                f"memory {rates.memory / 1e9:.1f} GB/s; first touch {rates.alloc / 1e9:.2f} GB/s"))


def calibrate_cpu(targets: list[Target], device: Any = None, **measure: Any) -> tuple[list[Target], CpuRates | None]:
    """Replaces the placeholder ``cpu`` target by one calibrated now (nothing to do without one);
    ``measure``: ``measure_cpu``'s sizes and window."""
    if not any(t.chip.family == "cpu" for t in targets):
        return targets, None
    rates = measure_cpu(device, **measure)
    chip = cpu_chip(rates)
    return [dataclasses.replace(t, chip=chip) if t.chip.family == "cpu" else t for t in targets], rates
