"""What an optimized HLO module text (``compiled.as_text()``) says: collectives and matmul FLOPs.

``collective_stats`` counts every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute with its result bytes per device, loop bodies weighted by their trip count (a
scan over layers runs its body L times) and async start/done pairs counted once; ``matmul_flops``
counts the dot products the same way (XLA's own ``cost_analysis`` counts a loop body once).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

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

    def in_loops(self) -> list[dict[str, Any]]:
        """The ops that run more than once per step (inside a loop body): each execution is a
        separate collective, so a per-chunk reduction shows here."""
        return [op for op in self.ops if op["executions"] > 1]

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
