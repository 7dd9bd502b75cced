"""``jaxdistil shard-study``: one distillation step, many meshes, measured side by side.

For every mesh (``data=8``, ``fsdp=8``, ``data=2,fsdp=2,tensor=2`` ...) the same step (same models,
init, batches and rules, except for command-line rule overrides) is lowered, compiled and run, and
the tool reports what each strategy costs:

  * per-device bytes of student params, optimizer state and teacher params, summed over the
    actual addressable shards of the placed arrays;
  * the compiler's memory analysis (argument / output / temp bytes) where the backend gives it;
  * collectives in the optimized HLO (``compiled.as_text()``): count and result bytes of
    all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute per step, with
    ops inside loops weighted by the loop's trip count (a scan over layers runs its body L times);
  * FLOPs: ``compiled.cost_analysis()`` (which counts a loop body once) and the dot products of
    the HLO with loop trip counts; compile time, median step time, tokens/s;
  * the loss after the same number of steps, and whether every strategy agrees within a tolerance.

Outputs: a terminal table (rich), CSV, JSON, Markdown and a PNG chart, plus each mesh's optimized
HLO and XLA compile log. ``run_study`` is the library entry point; ``run`` the CLI command.

Nothing here imports jax at module level: ``--host-devices N`` must be able to set
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jaxdistil.errors import UserError

# ----------------------------------------------------------------------------------------------
# Collectives in optimized HLO text
# ----------------------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Variants folded into the five reported kinds.
_ALIASES = {"ragged-all-to-all": "all-to-all"}

# Bits per element of HLO primitive types; sub-byte types are rounded up per array.
_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "token": 0, "opaque": 0,
}
_ARRAY_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_HEADER_RE = re.compile(r"^(?:ENTRY\s+)?%?([^\s(]+)\s*\(.*\{\s*$")
_NAME_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s*")
_OPCODE_RE = re.compile(r"\s*([a-z][a-z0-9\-_.]*)\(")
_CALLEE_RE = re.compile(
    r"\b(calls|to_apply|condition|body|true_computation|false_computation|branch_computations|"
    r"called_computations)=(\{[^}]*\}|%?[^\s,{}]+)"
)
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_OPERAND_RE = re.compile(r"%([^\s,()]+)")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')


def _element_bits(dtype: str) -> int:
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype]
    if dtype.startswith("f8"):
        return 8
    if dtype.startswith("f4"):
        return 4
    if dtype.startswith("f6"):
        return 6
    raise ValueError(f"unknown HLO element type {dtype!r}")


def array_bytes_list(type_text: str) -> list[int]:
    """Bytes of every array in an HLO type: ``f32[8,32]{1,0}`` -> [1024];
    ``(f32[], bf16[4,4])`` -> [4, 32]; bounded dynamic dims (``<=8``) count at their bound."""
    out = []
    for dtype, dims in _ARRAY_RE.findall(type_text):
        n = 1
        for dim in filter(None, (d.strip() for d in dims.split(","))):
            n *= int(dim.lstrip("<="))
        out.append(math.ceil(n * _element_bits(dtype) / 8))
    return out


def shape_bytes(type_text: str) -> int:
    """Total bytes of an HLO result type, tuples included (see ``array_bytes_list``)."""
    return sum(array_bytes_list(type_text))


def _split_type(rest: str) -> tuple[str, str]:
    """Splits ``TYPE opcode(...)...`` after ``name =`` into (TYPE, remainder)."""
    rest = rest.lstrip()
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1:]
        return rest, ""
    head, _, tail = rest.partition(" ")
    return head, " " + tail


def _top_level_elements(type_text: str) -> list[str]:
    """``(a, (b, c), d)`` -> ["a", "(b, c)", "d"]; a non-tuple type -> [itself]."""
    text = type_text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                parts.append(text[start:i])
        elif ch == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


@dataclasses.dataclass
class _Instr:
    name: str
    type_text: str
    opcode: str
    tail: str  # operands and attributes


@dataclasses.dataclass
class HloModuleText:
    """The computations of an HLO module text: name -> instructions, and the entry's name."""

    computations: dict[str, list[_Instr]]
    entry: str | None


def parse_hlo_module(text: str) -> HloModuleText:
    computations: dict[str, list[_Instr]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            # Computation headers: "[ENTRY] %name (params) -> type {" at column 0.
            if line[:1] not in (" ", "\t") and "->" in line and line.rstrip().endswith("{"):
                match = _HEADER_RE.match(line)
                if match:
                    current = match.group(1)
                    computations[current] = []
                    if line.startswith("ENTRY"):
                        entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        match = _NAME_RE.match(line)
        if not match:
            continue
        type_text, remainder = _split_type(line[match.end():])
        op = _OPCODE_RE.match(remainder)
        if not op:
            continue
        computations[current].append(_Instr(match.group(1), type_text, op.group(1), remainder[op.end():]))
    return HloModuleText(computations, entry)


@dataclasses.dataclass(frozen=True)
class _Call:
    callee: str
    per_call: int | None  # executions per execution of the caller; None: unknown loop trip count
    branch_of: str | None = None  # the conditional instruction, for its branches (one of them runs)


def _calls(instr: _Instr) -> list[_Call]:
    """Computations an instruction runs."""
    if instr.opcode in ("async-update", "async-done"):
        return []  # they name the computation of their async-start, which already counted it
    trip: int | None = 1
    if instr.opcode == "while":
        found = _TRIP_RE.search(instr.tail)
        trip = int(found.group(1)) if found else None
    out = []
    for attr, value in _CALLEE_RE.findall(instr.tail):
        names = [n.strip().lstrip("%") for n in value.strip("{}").split(",") if n.strip()]
        branch = attr in ("branch_computations", "true_computation", "false_computation")
        # The condition runs once more than the body; it never holds collectives worth counting.
        per_call = trip if attr == "body" else 1
        out.extend(_Call(name, per_call, instr.name if branch else None) for name in names)
    return out


@dataclasses.dataclass
class _Op:
    kind: str
    instr: _Instr  # the op (for an async pair: its -start, which carries the attributes)
    size: int  # result bytes of one execution


def _collective_ops(instrs: list[_Instr]) -> list[_Op]:
    """The collectives of one computation; an async -start/-done pair is one op sized by its -done."""
    ops: list[_Op] = []
    starts: dict[str, tuple[str, _Instr]] = {}
    for instr in instrs:
        kind, phase = _kind(instr.opcode)
        if kind is None:
            continue
        if phase == "start":
            starts[instr.name] = (kind, instr)
            continue
        source = instr
        if phase == "done":
            operand = _OPERAND_RE.search(instr.tail)
            if operand and operand.group(1) in starts:
                kind, source = starts.pop(operand.group(1))
        ops.append(_Op(kind, source, shape_bytes(instr.type_text)))
    for kind, instr in starts.values():
        # A start without its done in the same computation: its result tuple holds the operands,
        # then the outputs (then scratch scalars); the largest part is the output.
        size = max((shape_bytes(p) for p in _top_level_elements(instr.type_text)), default=0)
        ops.append(_Op(kind, instr, size))
    return ops


def _multiplicities(module: HloModuleText, own_bytes: Mapping[str, int]) -> tuple[dict[str, int], bool, int]:
    """Executions of each computation per run of the entry.

    Loop bodies run trip-count times. Of a conditional's branches only one runs and which one is
    not known from the program text: the branch moving the most collective bytes counts (an upper
    bound), the others count 0. Returns (multiplicity, some_trip_count_unknown, conditionals whose
    branches differ in collective bytes); unknown trip counts count once.
    """
    calls: dict[str, list[_Call]] = {}
    unknown = False
    for comp, instrs in module.computations.items():
        edges = []
        for instr in instrs:
            for call in _calls(instr):
                if call.callee not in module.computations:
                    continue
                if call.per_call is None:
                    unknown = True
                    call = dataclasses.replace(call, per_call=1)
                edges.append(call)
        calls[comp] = edges
    entry = module.entry or next(iter(module.computations), None)
    if entry is None:
        return {}, unknown, 0

    # Post-order of the call DAG reachable from the entry (callees before callers).
    order, seen = [], {entry}
    stack = [(entry, iter(calls[entry]))]
    while stack:
        node, it = stack[-1]
        for call in it:
            if call.callee not in seen:
                seen.add(call.callee)
                stack.append((call.callee, iter(calls[call.callee])))
                break
        else:
            order.append(node)
            stack.pop()

    def branch_groups(comp: str) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for call in calls[comp]:
            if call.branch_of is not None:
                groups.setdefault(call.branch_of, []).append(call.callee)
        return groups

    # Bytes per execution of each computation, callees included (heaviest branch of a conditional).
    weight: dict[str, int] = {}
    for comp in order:
        total = own_bytes.get(comp, 0)
        total += sum(c.per_call * weight[c.callee] for c in calls[comp] if c.branch_of is None)
        total += sum(max(weight[b] for b in branches) for branches in branch_groups(comp).values())
        weight[comp] = total

    mult: collections.Counter[str] = collections.Counter({entry: 1})
    ambiguous = 0
    for comp in reversed(order):
        m = mult[comp]
        for call in calls[comp]:
            if call.branch_of is None:
                mult[call.callee] += m * call.per_call
        for branches in branch_groups(comp).values():
            heaviest = max(branches, key=lambda b: weight[b])
            mult[heaviest] += m
            ambiguous += len({weight[b] for b in branches}) > 1
    return dict(mult), unknown, ambiguous


@dataclasses.dataclass
class CollectiveStats:
    """Per collective kind: executions per step, result bytes per device per step, ops in the text.

    conditionals: conditionals whose branches move different collective bytes; the heaviest
    branch is counted (an upper bound), see ``collective_stats``.
    """

    count: dict[str, int]
    bytes: dict[str, int]
    static_count: dict[str, int]
    trip_count_unknown: bool = False
    # Every collective op: {kind, name, bytes (one execution), executions per step, op_name}.
    ops: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    conditionals: int = 0

    def largest(self, n: int = 20) -> list[dict[str, Any]]:
        """The ``n`` ops moving the most bytes per step (where to look first)."""
        return sorted(self.ops, key=lambda op: -op["bytes"] * op["executions"])[:n]

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_count(self) -> int:
        return sum(self.count.values())


def _kind(opcode: str) -> tuple[str | None, str]:
    """opcode -> (collective kind or None, "" | "start" | "done")."""
    phase = ""
    base = opcode
    for suffix in ("-start", "-done"):
        if opcode.endswith(suffix):
            base, phase = opcode[: -len(suffix)], suffix[1:]
    base = _ALIASES.get(base, base)
    return (base if base in COLLECTIVES else None), phase


def collective_stats(hlo_text: str) -> CollectiveStats:
    """Counts the collectives of an optimized HLO module text (``compiled.as_text()``).

    Bytes are those of each op's *result* on one device (the gathered array for all-gather, the
    reduced array for all-reduce, the scattered piece for reduce-scatter). Async pairs
    (``all-gather-start``/``-done``...) count once, with the ``-done`` result's bytes; collectives
    wrapped in ``async-start`` computations count where they are defined. Ops in a ``while`` body
    count once per iteration when XLA knows the trip count (``known_trip_count``). Of a
    ``conditional``'s branches, the one moving the most bytes counts (the others 0): an upper bound,
    since which branch runs is decided at run time.
    """
    module = parse_hlo_module(hlo_text)
    per_comp = {comp: _collective_ops(instrs) for comp, instrs in module.computations.items()}
    own = {comp: sum(op.size for op in ops) for comp, ops in per_comp.items()}
    mult, unknown, ambiguous = _multiplicities(module, own)
    count = dict.fromkeys(COLLECTIVES, 0)
    nbytes = dict.fromkeys(COLLECTIVES, 0)
    static = dict.fromkeys(COLLECTIVES, 0)
    listing: list[dict[str, Any]] = []
    for comp, ops in per_comp.items():
        m = mult.get(comp, 0)
        for op in ops:
            static[op.kind] += 1
            count[op.kind] += m
            nbytes[op.kind] += m * op.size
            found = _OP_NAME_RE.search(op.instr.tail)
            # Combined ops (a tuple all-reduce of every gradient) list every source op: keep it short.
            text = found.group(1) if found else ""
            listing.append({"kind": op.kind, "name": op.instr.name, "bytes": op.size, "executions": m,
                            "op_name": text if len(text) <= 160 else text[:157] + "..."})
    return CollectiveStats(count, nbytes, static, unknown, listing, ambiguous)


_CONTRACT_RE = re.compile(r"lhs_contracting_dims=\{([\d,\s]*)\}")


def _dims(type_text: str) -> list[int]:
    """Dimensions of the first array in an HLO type (``f32[8,32]{1,0}`` -> [8, 32])."""
    found = _ARRAY_RE.search(type_text)
    if not found:
        return []
    return [int(d.strip().lstrip("<=")) for d in found.group(2).split(",") if d.strip()]


def matmul_flops(hlo_text: str) -> float:
    """FLOPs of the ``dot`` ops of an optimized HLO module per run, loop bodies x trip count.

    A dot [..] x [..] -> result costs 2 x |result| x (product of the lhs contracting dims). XLA's
    own ``cost_analysis()`` counts a ``while`` body once, so for a model whose layers run under
    ``scan`` it reports about one layer per model; this counts every iteration. Conditionals count
    the branch ``collective_stats`` counts. Elementwise work is left out (small next to matmuls).
    """
    module = parse_hlo_module(hlo_text)
    own = {comp: sum(op.size for op in _collective_ops(instrs))
           for comp, instrs in module.computations.items()}
    mult, _, _ = _multiplicities(module, own)
    total = 0.0
    for comp, instrs in module.computations.items():
        m = mult.get(comp, 0)
        if not m:
            continue
        shapes = {instr.name: instr.type_text for instr in instrs}
        for instr in instrs:
            if instr.opcode != "dot":
                continue
            lhs = _OPERAND_RE.search(instr.tail)
            contract = _CONTRACT_RE.search(instr.tail)
            if not lhs or lhs.group(1) not in shapes:
                continue
            lhs_dims = _dims(shapes[lhs.group(1)])
            k = 1
            for i in (contract.group(1).split(",") if contract else []):
                if i.strip():
                    k *= lhs_dims[int(i)]
            total += m * 2.0 * math.prod(_dims(instr.type_text)) * k
    return total


# ----------------------------------------------------------------------------------------------
# Memory: placed arrays and the compiler's analysis
# ----------------------------------------------------------------------------------------------


def per_device_bytes(tree: Any) -> dict[int, int]:
    """Bytes each device holds of a pytree of placed ``jax.Array`` s: device id -> bytes.

    Sums the actual addressable shards (so replicated arrays count fully on every device, sharded
    ones by their shard shape); non-array leaves count nothing.
    """
    import jax

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


# ----------------------------------------------------------------------------------------------
# Command-line pieces: mesh specs
# ----------------------------------------------------------------------------------------------

MESH_AXES = ("data", "fsdp", "tensor")


def parse_mesh_spec(text: str) -> dict[str, int]:
    """``"data=2,fsdp=2,tensor=2"`` -> {"data": 2, "fsdp": 2, "tensor": 2}.

    Axes left out are 1, except ``data`` which takes the devices left over (-1), as in the
    config's ``mesh`` section; so ``"fsdp=4"`` on 8 devices is data=2 x fsdp=4.
    """
    sizes = {"data": -1, "fsdp": 1, "tensor": 1}
    seen = set()
    for part in filter(None, (p.strip() for p in text.replace(" ", "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in MESH_AXES:
            raise UserError(
                f"mesh {text!r}: {part!r} is not axis=size with axis one of {', '.join(MESH_AXES)} "
                "(e.g. data=2,fsdp=2,tensor=2)")
        if key in seen:
            raise UserError(f"mesh {text!r}: axis {key} given twice")
        seen.add(key)
        try:
            sizes[key] = int(value)
        except ValueError:
            raise UserError(f"mesh {text!r}: size of {key} must be an integer, got {value!r}") from None
        if sizes[key] == 0 or sizes[key] < -1:
            raise UserError(f"mesh {text!r}: size of {key} must be positive or -1 (the rest), got {value}")
    if not seen:
        raise UserError(f"mesh {text!r} names no axis; write e.g. data=8 or data=2,fsdp=2,tensor=2")
    if sum(v == -1 for v in sizes.values()) > 1:
        raise UserError(f"mesh {text!r}: only one axis may be -1 (the rest of the devices)")
    return sizes


def resolve_mesh_sizes(sizes: Mapping[str, int], n_devices: int, label: str = "") -> dict[str, int]:
    """Fills the -1 axis and checks the product against the device count (one-line UserError)."""
    label = label or ",".join(f"{k}={v}" for k, v in sizes.items() if v != 1)
    out = dict(sizes)
    fixed = math.prod(v for v in out.values() if v != -1)
    free = [k for k, v in out.items() if v == -1]
    factors = [f"{k}={v}" for k, v in out.items() if v not in (-1, 1)]
    parts = " x ".join(factors) + (f" = {fixed}" if len(factors) > 1 else "") if factors else "all axes 1"
    if free:
        if n_devices % fixed:
            raise UserError(
                f"mesh {label}: {parts} does not divide the {n_devices} devices "
                f"({free[0]} takes the rest); use sizes whose product divides {n_devices}")
        out[free[0]] = n_devices // fixed
    elif fixed != n_devices:
        raise UserError(
            f"mesh {label}: {parts} devices but {n_devices} are available; "
            f"make the product {n_devices} or leave data out (it takes the rest)")
    return out


def mesh_label(sizes: Mapping[str, int]) -> str:
    """Canonical row name: the axes larger than 1 (``data=2,fsdp=4``), or ``data=1``."""
    parts = [f"{k}={sizes[k]}" for k in MESH_AXES if sizes.get(k, 1) > 1]
    return ",".join(parts) or "data=1"


# ----------------------------------------------------------------------------------------------
# Results and their outputs: terminal table, CSV, JSON, Markdown, PNG
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StrategyResult:
    """Everything measured for one mesh. Bytes are per device; times in seconds."""

    mesh: str
    sizes: dict[str, int]
    devices: int
    student_param_bytes: int
    opt_state_bytes: int
    teacher_param_bytes: int
    memory: dict[str, int | None]
    collectives: CollectiveStats
    flops: float | None  # compiled.cost_analysis()["flops"] (loop bodies once)
    lower_s: float
    compile_s: float
    step_times_s: list[float]
    tokens_per_step: int
    losses: list[float]
    notes: list[str] = dataclasses.field(default_factory=list)
    matmul_flops: float | None = None  # dots of the HLO, loop bodies x trip count (matmul_flops)
    loss_delta: float | None = None  # vs the first strategy
    loss_agrees: bool | None = None

    @property
    def state_bytes(self) -> int:
        return self.student_param_bytes + self.opt_state_bytes + self.teacher_param_bytes

    @property
    def step_s(self) -> float:
        times = sorted(self.step_times_s)
        if not times:
            return float("nan")
        mid = len(times) // 2
        return times[mid] if len(times) % 2 else 0.5 * (times[mid - 1] + times[mid])

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s > 0 else float("nan")

    @property
    def loss(self) -> float:
        return self.losses[-1] if self.losses else float("nan")

    def flat(self) -> dict[str, Any]:
        """One CSV row: every figure, plain scalars."""
        row: dict[str, Any] = {"mesh": self.mesh, "devices": self.devices}
        row.update({k: self.sizes[k] for k in MESH_AXES})
        row.update(
            student_param_bytes=self.student_param_bytes, opt_state_bytes=self.opt_state_bytes,
            teacher_param_bytes=self.teacher_param_bytes, state_bytes=self.state_bytes,
        )
        row.update({f"xla_{k}_bytes": v for k, v in self.memory.items()})
        for kind in COLLECTIVES:
            key = kind.replace("-", "_")
            row[f"{key}_count"] = self.collectives.count[kind]
            row[f"{key}_bytes"] = self.collectives.bytes[kind]
        row.update(
            collective_count=self.collectives.total_count, collective_bytes=self.collectives.total_bytes,
            trip_count_unknown=self.collectives.trip_count_unknown,
            conditionals_upper_bound=self.collectives.conditionals,
            matmul_flops_per_device=self.matmul_flops, xla_flops_per_device=self.flops,
            lower_s=round(self.lower_s, 4), compile_s=round(self.compile_s, 4),
            step_s_median=self.step_s, tokens_per_s=self.tokens_per_s, loss=self.loss,
            loss_delta=self.loss_delta, loss_agrees=self.loss_agrees, notes="; ".join(self.notes),
        )
        return row

    def to_json(self) -> dict[str, Any]:
        out = self.flat()
        out.update(
            sizes=self.sizes, memory=self.memory, step_times_s=self.step_times_s, losses=self.losses,
            collectives={"count": self.collectives.count, "bytes": self.collectives.bytes,
                         "static_count": self.collectives.static_count,
                         "largest": self.collectives.largest(20)},
            notes=self.notes,
        )
        return out


def check_agreement(results: list[StrategyResult], tolerance: float) -> bool:
    """Sets ``loss_delta`` / ``loss_agrees`` against the first strategy; True when all agree.

    Agreement: |loss - loss_ref| <= tolerance * max(1, |loss_ref|), i.e. absolute below a loss of
    1 and relative above it (float32 sums in a different order differ in the last bits).
    """
    if not results:
        return True
    ref = results[0].loss
    bound = tolerance * max(1.0, abs(ref))
    ok = True
    for res in results:
        res.loss_delta = res.loss - ref
        res.loss_agrees = bool(math.isfinite(res.loss) and abs(res.loss_delta) <= bound)
        ok &= res.loss_agrees
    return ok


def fmt_bytes(n: float | None) -> str:
    """Binary units, 3 significant digits: 1536 -> '1.50 KiB'; None -> 'n/a'."""
    if n is None:
        return "n/a"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"


def _fmt_coll(stats: CollectiveStats, kind: str) -> str:
    n = stats.count[kind]
    return "-" if n == 0 else f"{n} / {fmt_bytes(stats.bytes[kind])}"


_SHORT = {"all-reduce": "all-reduce", "all-gather": "all-gather", "reduce-scatter": "reduce-scatter",
          "all-to-all": "all-to-all", "collective-permute": "coll-permute"}

TABLE_COLUMNS = (
    "mesh", "student/dev", "opt state/dev", "teacher/dev", "XLA args", "XLA temp",
    *(_SHORT[k] for k in COLLECTIVES), "matmul GFLOP/dev", "XLA GFLOP/dev", "compile s", "step ms",
    "tokens/s", "loss", "Δ loss",
)


def table_rows(results: list[StrategyResult]) -> list[list[str]]:
    """The display table (one row per strategy, ``TABLE_COLUMNS``), as strings."""
    rows = []
    for r in results:
        agree = "" if r.loss_agrees is None else (" ✓" if r.loss_agrees else " ✗")
        rows.append([
            r.mesh,
            fmt_bytes(r.student_param_bytes), fmt_bytes(r.opt_state_bytes), fmt_bytes(r.teacher_param_bytes),
            fmt_bytes(r.memory.get("argument")), fmt_bytes(r.memory.get("temp")),
            *(_fmt_coll(r.collectives, k) for k in COLLECTIVES),
            "n/a" if r.matmul_flops is None else f"{r.matmul_flops / 1e9:.3g}",
            "n/a" if r.flops is None else f"{r.flops / 1e9:.3g}",
            f"{r.compile_s:.1f}", f"{r.step_s * 1e3:.0f}", f"{r.tokens_per_s:,.0f}",
            f"{r.loss:.6f}", ("n/a" if r.loss_delta is None else f"{r.loss_delta:+.1e}") + agree,
        ])
    return rows


def print_table(results: list[StrategyResult], title: str = "", file: Any = None) -> None:
    """The table on the terminal (rich; plain aligned text when rich is missing)."""
    rows = table_rows(results)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_table(results), file=file)
        return
    table = Table(title=title or None, show_lines=False)
    for i, name in enumerate(TABLE_COLUMNS):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=320)  # a log file: no wrapping into a narrow column
    console.print(table)


def markdown_table(results: list[StrategyResult]) -> str:
    """The same table as GitHub Markdown (what the README shows)."""
    rows = table_rows(results)
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_csv(results: list[StrategyResult], path: Any) -> None:
    import csv

    flat = [r.flat() for r in results]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]) if flat else ["mesh"])
        writer.writeheader()
        writer.writerows(flat)


def write_json(results: list[StrategyResult], meta: Mapping[str, Any], path: Any) -> None:
    doc = {"meta": dict(meta), "strategies": [r.to_json() for r in results]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=2, default=str)
        f.write("\n")


def write_chart(results: list[StrategyResult], path: Any, title: str = "") -> None:
    """PNG: per-device memory (stacked: student, optimizer, teacher, XLA temp) and collective
    bytes per step (stacked by kind), one bar per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.mesh for r in results]
    x = list(range(len(results)))
    mib = 1024.0**2
    fig, (ax_mem, ax_coll) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(results) + 6), 4.8))
    bottom = [0.0] * len(results)
    parts = [
        ("student params", [r.student_param_bytes for r in results], "tab:blue"),
        ("optimizer state", [r.opt_state_bytes for r in results], "tab:orange"),
        ("teacher params", [r.teacher_param_bytes for r in results], "tab:green"),
        ("XLA temp", [r.memory.get("temp") or 0 for r in results], "lightgray"),
    ]
    for label, values, color in parts:
        heights = [v / mib for v in values]
        ax_mem.bar(x, heights, bottom=bottom, label=label, color=color,
                   hatch="//" if label == "XLA temp" else None)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax_mem.set_title("memory per device")
    ax_mem.set_ylabel("MiB")
    bottom = [0.0] * len(results)
    colors = dict(zip(COLLECTIVES, ("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")))
    for kind in COLLECTIVES:
        heights = [r.collectives.bytes[kind] / mib for r in results]
        if any(heights):
            ax_coll.bar(x, heights, bottom=bottom, label=kind, color=colors[kind])
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax_coll.set_title("collective bytes per step (per device)")
    ax_coll.set_ylabel("MiB")
    for ax in (ax_mem, ax_coll):
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=20, ha="right")
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# The study: same step, one mesh at a time
# ----------------------------------------------------------------------------------------------

# Shapes of well-known hub models, so a study needs no download (it uses random weights anyway).
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": {"model_type": "bert"},
    "bert-base-cased": {"model_type": "bert", "vocab_size": 28996},
    "bert-large-uncased": {"model_type": "bert", "hidden_size": 1024, "num_hidden_layers": 24,
                           "num_attention_heads": 16, "intermediate_size": 4096},
    "distilbert-base-uncased": {"model_type": "distilbert"},
}


@dataclasses.dataclass(frozen=True)
class StudySetup:
    """What every strategy shares: models, step, batch shape, seed and rules.

    teacher / student: model configs (shapes); weights are random from ``seed``, the same for
      every mesh (born sharded; JAX's partitionable PRNG draws the same values whatever the layout).
    step: jaxdistil.distill.step.StepConfig (loss, masking, optim, dtype, remat, mask_id).
    batch, seq: global batch [batch, seq] of synthetic token ids, a different batch per step.
    rules: logical-axis rule overrides (``"mlp=tensor"``), applied on top of sharding.RULES.
    strict: a dimension its rule cannot split evenly is an error (True) or replicated with a note.
    """

    teacher: Any
    student: Any
    step: Any
    batch: int
    seq: int
    seed: int = 0
    rules: tuple[str, ...] = ()
    strict: bool = True


def model_config_for(source: str, what: str) -> Any:
    """A model config (shape only) from a model dir / config.json / run dir / preset hub id."""
    from pathlib import Path

    from jaxdistil.models import ConfigError, config_from_hf_dict, load_config

    path = Path(source).expanduser()
    candidates = [path, path / "student"] if path.is_dir() else [path]
    for candidate in candidates:
        if candidate.is_file() or (candidate / "config.json").is_file():
            try:
                return load_config(candidate)
            except ConfigError as err:
                raise UserError(f"{what}: {err}") from None
    if source in PRESETS:
        return config_from_hf_dict(dict(PRESETS[source]), source)
    raise UserError(
        f"{what} {source!r}: no config.json there; the study needs only the model's shape: give a model "
        f"or run directory, a config.json, or one of {', '.join(PRESETS)}")


def setup_from_run_config(cfg: Any, batch: int | None, seq: int | None, seed: int | None,
                          rules: Iterable[str] = (), strict: bool = True, total_steps: int = 1) -> StudySetup:
    """A StudySetup from a RunConfig (jaxdistil.config): its teacher/student, loss, masking,
    optim, dtype and mesh rules; ``rules`` are extra overrides (``mlp=tensor``)."""
    from jaxdistil.distill.step import StepConfig
    from jaxdistil.models import BertConfig, DistilBertConfig

    teacher = None
    if cfg.teacher.model not in (None, "", "none"):
        teacher = model_config_for(cfg.teacher.model, "teacher.model")
    student_cfg = cfg.student
    if student_cfg.init == "teacher":
        if teacher is None:
            raise UserError("student.init=teacher needs teacher.model; set student.init=random for MLM-only")
        from jaxdistil.init_student import check_layers, student_config_from_teacher

        layers = check_layers(student_cfg.layers, teacher.layers)
        student = student_config_from_teacher(teacher, len(layers), dict(student_cfg.config))
    elif student_cfg.init == "random":
        cls = DistilBertConfig if student_cfg.model_type == "distilbert" else BertConfig
        try:
            student = cls(**dict(student_cfg.config))
        except (TypeError, ValueError) as err:
            raise UserError(f"student.config: {err}") from None
    else:
        student = model_config_for(student_cfg.init, "student.init")
    optim = cfg.optim
    if optim.total_steps < total_steps:
        optim = dataclasses.replace(optim, total_steps=total_steps)
    vocab = student.vocab_size
    # [MASK] is 103 in the BERT vocabularies; tiny test vocabularies use their last id.
    mask_id = 103 if vocab > 103 else vocab - 1
    step = StepConfig(loss=cfg.loss, masking=cfg.masking, optim=optim, mask_id=mask_id,
                      dtype=cfg.train.dtype, remat=cfg.train.remat)
    return StudySetup(
        teacher=teacher, student=student, step=step,
        batch=batch or cfg.loader.batch_size, seq=seq or cfg.loader.max_len,
        seed=cfg.train.seed if seed is None else seed,
        rules=tuple(cfg.mesh.rules) + tuple(rules), strict=strict,
    )


def synthetic_batches(setup: StudySetup, n: int) -> list[dict[str, Any]]:
    """``n`` host batches {input_ids, attention_mask} [batch, seq] int32 from ``setup.seed``:
    ``[CLS] random ids [SEP]`` with lengths between seq/2 and seq (so padding is exercised)."""
    import numpy as np

    rng = np.random.default_rng(setup.seed)
    vocab = setup.student.vocab_size
    low = 1000 if vocab > 2000 else min(5, vocab - 1)  # skip BERT's [unused]/special ids
    out = []
    for _ in range(n):
        ids = rng.integers(low, vocab, size=(setup.batch, setup.seq), dtype=np.int32)
        lengths = rng.integers(max(2, setup.seq // 2), setup.seq + 1, size=setup.batch)
        mask = (np.arange(setup.seq)[None, :] < lengths[:, None]).astype(np.int32)
        if vocab > 103:
            ids[:, 0] = 101
            ids[np.arange(setup.batch), lengths - 1] = 102
        out.append({"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask})
    return out


def token_weights(vocab: int) -> Any:
    """Masking weights [V] float32: uniform, 0 for padding and (BERT vocabularies) [CLS]/[SEP]/[MASK]."""
    import numpy as np

    weights = np.ones(vocab, np.float32)
    weights[0] = 0.0
    if vocab > 103:
        weights[[100, 101, 102, 103]] = 0.0
    return weights


@dataclasses.dataclass
class _Prepared:
    mesh: Any
    compiled: Any
    state: Any
    teacher_params: Any
    batches: list
    weights: Any
    notes: list[str]
    lower_s: float
    compile_s: float
    xla_log: str = ""


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Captures what C++ code (XLA) writes to file descriptor 2; yields a list that holds the
    text after the block. XLA's SPMD warnings ("Involuntary full rematerialization") say where
    the partitioner had to replicate a tensor to reshard it, which the study reports per mesh."""
    import sys
    import tempfile

    out: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (some embedded interpreters): capture nothing
        yield out
        return
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        failed = True
        try:
            yield out
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read()
            out.append(text.decode("utf-8", "replace"))
            if failed:  # the block raised: what XLA said may explain why, so show it
                os.write(2, text)


REMAT_WARNING = "Involuntary full rematerialization"


def _mesh_and_rules(setup: StudySetup, sizes: Mapping[str, int], devices: list) -> tuple[str, Any, Any]:
    """(row label, Mesh, rules table) of one strategy; UserError when the batch does not split."""
    from jaxdistil.distill import sharding as shd

    label = mesh_label(sizes)
    mesh = shd.make_mesh(shd.MeshConfig(**sizes), devices)
    rules = shd.make_rules(setup.rules)
    try:
        shd.check_batch(setup.batch, mesh, setup.step.grad_accum_steps)
    except UserError as err:
        raise UserError(f"mesh {label}: {err}") from None
    return label, mesh, rules


def _split_notes(caught: list) -> list[str]:
    """The sharding module's "does not divide ... replicated" warnings (strict=False), once each."""
    return list(dict.fromkeys(str(w.message) for w in caught if "does not divide" in str(w.message)))


def _prepare(setup: StudySetup, sizes: Mapping[str, int], devices: list, host_batches: list,
             compiler_options: Mapping[str, Any] | None = None) -> _Prepared:
    """Mesh, born-sharded state and teacher, placed batches, and the compiled step for one mesh."""
    import time
    import warnings

    import jax

    from jaxdistil.distill import sharding as shd
    from jaxdistil.distill import step as stp
    from jaxdistil.distill.optim import make_optimizer
    from jaxdistil.models import init_params

    label, mesh, rules = _mesh_and_rules(setup, sizes, devices)
    student_m, teacher_m = stp.build_models(setup.step, setup.student, setup.teacher)
    tx, schedule = make_optimizer(setup.step.optim, model_cfg=setup.student)
    key_student, key_teacher = jax.random.split(jax.random.PRNGKey(setup.seed))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            state, state_sh = stp.init_train_state(student_m, key_student, tx, mesh, rules,
                                                   strict=setup.strict)
            teacher_params = teacher_sh = None
            if teacher_m is not None:
                teacher_sh = shd.param_shardings(teacher_m, mesh, rules, strict=setup.strict)
                init_teacher = jax.jit(lambda r: init_params(teacher_m, r), out_shardings=teacher_sh)
                teacher_params = init_teacher(key_teacher)
        except UserError as err:
            raise UserError(f"mesh {label}: {err}") from None
    notes = _split_notes(caught)
    step_fn = stp.make_train_step(student_m, teacher_m, setup.step, tx, schedule, mesh, rules, state_sh,
                                  teacher_sh)
    batches = [shd.shard_batch(b, mesh) for b in host_batches]
    weights = jax.device_put(token_weights(setup.student.vocab_size), shd.replicated(mesh))
    with captured_stderr() as xla_log:
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, teacher_params, batches[0], weights)
        t1 = time.perf_counter()
        try:
            compiled = lowered.compile(compiler_options=dict(compiler_options or {}) or None)
        except Exception as err:  # a bad --compiler-option is the usual cause
            if compiler_options and "compile option" in str(err):
                raise UserError(f"{str(err).splitlines()[0]}; check --compiler-option") from None
            raise
        t2 = time.perf_counter()
    log = "".join(xla_log)
    remats = log.count(REMAT_WARNING)
    if remats:
        notes.append(f"XLA: {remats} involuntary full rematerialization(s): the partitioner replicated a "
                     "tensor to reshard it (see the mesh's .log in hlo/)")
    return _Prepared(mesh, compiled, state, teacher_params, batches, weights, notes, t1 - t0, t2 - t1, log)


def validate_strategy(setup: StudySetup, sizes: Mapping[str, int], devices: list) -> list[str]:
    """Checks a mesh before anything runs (device count, batch split, every rule's split against
    every parameter's shape, abstractly); returns the notes of replicated dims (strict=False)."""
    import warnings

    from jaxdistil.distill import sharding as shd
    from jaxdistil.distill import step as stp

    label, mesh, rules = _mesh_and_rules(setup, sizes, devices)
    student_m, teacher_m = stp.build_models(setup.step, setup.student, setup.teacher)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # Abstract (eval_shape) inits: no array is built. The optimizer's moments have their
            # params' shapes and rules, so checking the params covers them.
            shd.param_shardings(student_m, mesh, rules, strict=setup.strict)
            if teacher_m is not None:
                shd.param_shardings(teacher_m, mesh, rules, strict=setup.strict)
        except UserError as err:
            raise UserError(f"mesh {label}: {err}") from None
    return _split_notes(caught)


def measure_strategy(setup: StudySetup, sizes: Mapping[str, int], devices: list, host_batches: list,
                     steps: int, warmup: int = 1, compiler_options: Mapping[str, Any] | None = None,
                     hlo_dir: Any = None) -> StrategyResult:
    """Builds, compiles and runs the step on one mesh; ``warmup + steps`` updates, the last
    ``steps`` timed. The loss reported is the step's loss at the last update.

    hlo_dir: when given, the optimized HLO (``<mesh>.hlo.txt``) and XLA's compile log
    (``<mesh>.log``) are written there.
    """
    import time
    from pathlib import Path

    import jax

    prep = _prepare(setup, sizes, devices, host_batches, compiler_options)
    hlo = prep.compiled.as_text()
    if hlo_dir is not None:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        stem = mesh_label(sizes).replace(",", "_").replace("=", "")
        (Path(hlo_dir) / f"{stem}.hlo.txt").write_text(hlo)
        (Path(hlo_dir) / f"{stem}.log").write_text(prep.xla_log)
    result = StrategyResult(
        mesh=mesh_label(sizes), sizes=dict(prep.mesh.shape), devices=prep.mesh.size,
        student_param_bytes=max_device_bytes(prep.state.params),
        opt_state_bytes=max_device_bytes(prep.state.opt_state),
        teacher_param_bytes=max_device_bytes(prep.teacher_params),
        memory=memory_analysis(prep.compiled), collectives=collective_stats(hlo),
        flops=cost_flops(prep.compiled), lower_s=prep.lower_s, compile_s=prep.compile_s,
        step_times_s=[], tokens_per_step=setup.batch * setup.seq, losses=[], notes=prep.notes,
        matmul_flops=matmul_flops(hlo),
    )
    if result.collectives.trip_count_unknown:
        result.notes.append("a loop without a known trip count: its collectives count once")
    if result.collectives.conditionals:
        result.notes.append(
            f"{result.collectives.conditionals} conditional(s) with branches moving different collective "
            "bytes: the heaviest branch is counted (an upper bound)")
    state = prep.state
    for i in range(warmup + steps):
        batch = prep.batches[i % len(prep.batches)]
        t0 = time.perf_counter()
        state, metrics = prep.compiled(state, prep.teacher_params, batch, prep.weights)
        jax.block_until_ready((state, metrics))
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            result.step_times_s.append(elapsed)
        result.losses.append(float(metrics["loss"]))
    del state, prep
    return result


@dataclasses.dataclass
class StudyReport:
    results: list[StrategyResult]
    agree: bool
    tolerance: float
    meta: dict[str, Any]


def machine_info(devices: list | None = None) -> dict[str, Any]:
    """Where the figures come from: CPU model, load, JAX backend and devices, date."""
    import datetime
    import platform

    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = list(jax.devices() if devices is None else devices)
    try:
        load = round(os.getloadavg()[0], 2)  # other processes competing for the cores skew timings
    except OSError:
        load = None
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cpu_cores": os.cpu_count(), "load_average_1min": load, "backend": devices[0].platform,
        "device_kind": devices[0].device_kind, "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_study(setup: StudySetup, meshes: list[str | Mapping[str, int]], steps: int = 3, warmup: int = 1,
              tolerance: float = 1e-5, devices: list | None = None, log: Any = None,
              compiler_options: Mapping[str, Any] | None = None, hlo_dir: Any = None) -> StudyReport:
    """Measures every mesh (``"data=2,fsdp=4"`` or a sizes dict, -1 allowed) on the same work.

    All meshes are validated first (device count, batch and parameter splits), so a bad one fails
    in seconds, before any compilation. compiler_options: XLA options for the step's compile
    (``{"xla_backend_optimization_level": 0}``), the same for every mesh. log: a callable taking a
    progress line.
    """
    import gc

    import jax

    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0, got {steps} and {warmup}")
    devices = list(jax.devices() if devices is None else devices)
    start = machine_info(devices)
    resolved = [
        resolve_mesh_sizes(parse_mesh_spec(m), len(devices), m) if isinstance(m, str)
        else resolve_mesh_sizes(m, len(devices)) for m in meshes
    ]
    labels = [mesh_label(m) for m in resolved]
    dupes = [label for label, n in collections.Counter(labels).items() if n > 1]
    if dupes:
        raise UserError(f"mesh {dupes[0]} is given twice; list each strategy once")
    notes = {label: validate_strategy(setup, m, devices) for label, m in zip(labels, resolved)}
    if log:
        log(f"shard-study on {len(devices)} {devices[0].platform} devices: {describe_models(setup)}")
    host_batches = synthetic_batches(setup, warmup + steps)
    results = []
    for i, (label, sizes) in enumerate(zip(labels, resolved)):
        if log:
            log(f"[{i + 1}/{len(resolved)}] {label}: compiling and running {warmup} + {steps} steps")
        res = measure_strategy(setup, sizes, devices, host_batches, steps, warmup, compiler_options, hlo_dir)
        for note in notes[label]:
            if note not in res.notes:
                res.notes.append(note)
        if log:
            log(f"    compile {res.compile_s:.1f} s, step {res.step_s * 1e3:.0f} ms, loss {res.loss:.6f}")
        results.append(res)
        gc.collect()
    agree = check_agreement(results, tolerance)
    meta = machine_info(devices)
    meta["load_average_1min"] = [start["load_average_1min"], meta["load_average_1min"]]  # start, end
    meta.update(
        devices=len(devices), batch=setup.batch, seq=setup.seq, steps=steps, warmup=warmup,
        tolerance=tolerance, losses_agree=agree, rules=list(setup.rules), strict=setup.strict,
        compiler_options=dict(compiler_options or {}),
        seed=setup.seed, dtype=setup.step.dtype, remat=setup.step.remat,
        grad_accum_steps=setup.step.grad_accum_steps,
        teacher=None if setup.teacher is None else setup.teacher.to_hf_dict(),
        student=setup.student.to_hf_dict(),
    )
    return StudyReport(results, agree, tolerance, meta)


def describe_models(setup: StudySetup) -> str:
    def one(cfg: Any) -> str:
        return (f"{cfg.model_type} {cfg.layers}x{cfg.hidden} (heads {cfg.heads}, ffn {cfg.mlp}, "
                f"vocab {cfg.vocab_size})")

    teacher = "no teacher (MLM only)" if setup.teacher is None else f"teacher {one(setup.teacher)}"
    return f"{teacher}, student {one(setup.student)}, batch {setup.batch}x{setup.seq}, {setup.step.dtype}"


def write_outputs(report: StudyReport, out_dir: Any, title: str = "") -> dict[str, Any]:
    """shard_study.csv / .json / .md / .png into ``out_dir``; returns {kind: path}."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "shard_study.csv", "json": out / "shard_study.json",
             "markdown": out / "shard_study.md", "png": out / "shard_study.png"}
    write_csv(report.results, paths["csv"])
    write_json(report.results, report.meta, paths["json"])
    paths["markdown"].write_text((f"{title}\n\n" if title else "") + markdown_table(report.results))
    write_chart(report.results, paths["png"], title)
    return paths


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

HOST_DEVICES_FLAG = "--xla_force_host_platform_device_count"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Compare mesh strategies for the distillation step: per-device memory, collectives, FLOPs, "
        "compile and step time, tokens/s and the loss, one row per mesh. For a CPU study with N "
        f"simulated devices, set XLA_FLAGS={HOST_DEVICES_FLAG}=N or pass --host-devices N.")
    parser.add_argument(
        "items", nargs="*", metavar="MESH|KEY=VALUE",
        help="meshes (data=8, fsdp=8, data=2,fsdp=2,tensor=2; an axis left out is 1, data takes the "
             "rest) and config overrides with a dot (train.dtype=bfloat16), including logical-axis rule "
             "overrides: rules.mlp=tensor, rules.embed=fsdp,tensor, rules.vocab=none")
    parser.add_argument("--meshes", nargs="+", default=[], metavar="MESH",
                        help="meshes to compare (same syntax as above); default: data=N and fsdp=N")
    parser.add_argument("--config", default=None,
                        help="run config YAML (teacher, student, loss, optim, mesh.rules...)")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch rows (default: loader.batch_size)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: loader.max_len)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mesh (default 3)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps before them (default 1); the loss is taken after warmup+steps")
    parser.add_argument("--output", default="shard-study", help="directory for CSV, JSON, Markdown, PNG, HLO")
    parser.add_argument("--seed", type=int, default=None, help="init and batch seed (default: train.seed)")
    parser.add_argument("--tolerance", type=float, default=1e-5,
                        help="losses must agree within tolerance x max(1, |loss|) (default 1e-5)")
    parser.add_argument("--allow-replicate", action="store_true",
                        help="replicate a dimension its rule cannot split evenly (noted per mesh) "
                             "instead of stopping with an error")
    parser.add_argument("--host-devices", type=int, default=None, metavar="N",
                        help=f"run on N simulated CPU devices (sets XLA_FLAGS={HOST_DEVICES_FLAG}=N "
                             "before JAX starts)")
    parser.add_argument("--compiler-option", action="append", default=[], metavar="KEY=VALUE",
                        help="XLA option for the step's compile, e.g. xla_backend_optimization_level=0 "
                             "(repeatable; the same for every mesh)")
    parser.add_argument("--no-hlo", action="store_true", help="do not write each mesh's optimized HLO")


def split_items(items: Iterable[str]) -> tuple[list[str], list[str], list[str]]:
    """Positional items -> (meshes, config overrides, rule overrides).

    A config key always has a dot (``train.dtype``); a mesh never does (``data=2,fsdp=4``).
    ``rules.X=...`` (and ``mesh.rules.X=...``) are rule overrides.
    """
    meshes, overrides, rules = [], [], []
    for item in items:
        key = item.split("=", 1)[0].strip()
        if "." not in key:
            meshes.append(item)
        elif key.startswith(("rules.", "mesh.rules.")):
            rules.append(item.removeprefix("mesh."))
        else:
            overrides.append(item)
    return meshes, overrides, rules


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UserError(
            f"--compiler-option {text!r} is not KEY=VALUE (e.g. xla_backend_optimization_level=0)")
    value = value.strip()
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    if value.lower() in ("true", "false"):
        return key.strip(), value.lower() == "true"
    return key.strip(), value


def _set_host_devices(n: int) -> None:
    """Asks XLA for ``n`` CPU devices; must happen before JAX initialises its backends."""
    import sys

    if n < 1:
        raise UserError(f"--host-devices must be >= 1, got {n}")
    flags = os.environ.get("XLA_FLAGS", "")
    found = re.search(re.escape(HOST_DEVICES_FLAG) + r"=(\d+)", flags)
    if found and int(found.group(1)) != n:
        raise UserError(f"XLA_FLAGS already sets {HOST_DEVICES_FLAG}={found.group(1)} but --host-devices "
                        f"is {n}; "
                        "drop one of them")
    if not found:
        os.environ["XLA_FLAGS"] = f"{flags} {HOST_DEVICES_FLAG}={n}".strip()
    if "jax" in sys.modules:
        import jax

        have = len(jax.devices("cpu"))
        if have != n:
            raise UserError(f"--host-devices {n} came too late: JAX already started with {have} CPU devices; "
                            f"set XLA_FLAGS={HOST_DEVICES_FLAG}={n} in the environment instead")


def run(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    if args.host_devices is not None:
        _set_host_devices(args.host_devices)  # before anything imports jax
    meshes, overrides, rules = split_items(list(args.items) + list(args.meshes))
    options = dict(_parse_option(o) for o in args.compiler_option)

    import jax

    from jaxdistil.config import load_run_config

    devices = jax.devices("cpu") if args.host_devices is not None else jax.devices()
    n = len(devices)
    meshes = meshes or [f"data={n}", f"fsdp={n}"]
    for m in meshes:  # mesh errors first, before the config is read
        resolve_mesh_sizes(parse_mesh_spec(m), n, m)
    cfg = load_run_config(args.config, overrides)
    total = args.warmup + args.steps
    setup = setup_from_run_config(cfg, args.batch, args.seq, args.seed, rules,
                                  strict=not args.allow_replicate, total_steps=total)
    if setup.batch < 1 or setup.seq < 2:
        raise UserError(f"--batch must be >= 1 and --seq >= 2, got {setup.batch} and {setup.seq}")
    if setup.seq > setup.student.max_position_embeddings:
        raise UserError(
            f"--seq {setup.seq} exceeds the model's {setup.student.max_position_embeddings} positions")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    out = Path(args.output)
    report = run_study(setup, meshes, args.steps, args.warmup, args.tolerance, devices, log, options,
                       None if args.no_hlo else out / "hlo")
    title = describe_models(setup)
    paths = write_outputs(report, out, title)
    print_table(report.results, title=title)
    for res in report.results:
        for note in res.notes:
            print(f"  {res.mesh}: {note}")
    ref = report.results[0].mesh
    if report.agree:
        print(f"losses agree: every strategy within {args.tolerance:g} x max(1, |loss|) of {ref} "
              f"after {total} steps")
    else:
        worst = max(report.results, key=lambda r: abs(r.loss_delta or 0.0))
        print(f"LOSSES DISAGREE: {worst.mesh} differs by {worst.loss_delta:+.3g} from {ref} "
              f"(tolerance {args.tolerance:g} x max(1, |loss|))")
    meta = report.meta
    load_start, load_end = meta["load_average_1min"]
    print(f"{meta['cpu']} ({meta['cpu_cores']} cores), {meta['backend']} x {meta['devices']}, "
          f"jax {meta['jax']}, {meta['date']}; 1-min load average {load_start} at start, {load_end} at end")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.agree else 1
