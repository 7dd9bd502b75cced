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
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
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
        users = _users(module.computations[comp]) if ops else {}
        for op in ops:
            static[op.kind] += 1
            count[op.kind] += m
            nbytes[op.kind] += m * op.size
            found = _OP_NAME_RE.search(op.instr.tail)
            # Combined ops (a tuple all-reduce of every gradient) list every source op: keep it short.
            text = found.group(1) if found else ""
            groups = replica_groups(op.instr.tail)
            size = len(groups[0]) if groups else 0
            scattered = _sliced_bytes(module, op.instr, users, size) if op.instr.opcode == "all-reduce" else 0
            listing.append({"kind": op.kind, "name": op.instr.name, "bytes": op.size, "executions": m,
                            "op_name": text if len(text) <= 160 else text[:157] + "...",
                            "group_size": size, "groups": groups, "sliced_bytes": scattered})
    return CollectiveStats(count, nbytes, static, unknown, listing, ambiguous)


def _users(instrs: list[_Instr]) -> dict[str, list[_Instr]]:
    out: dict[str, list[_Instr]] = collections.defaultdict(list)
    for instr in instrs:
        for operand in _operand_names(instr):
            out[operand].append(instr)
    return out


def _only_sliced(module: HloModuleText, name: str, nbytes: int, users: Mapping[str, list[_Instr]],
                 n: int, cache: dict[str, _Fused]) -> bool:
    """Whether every use of the array ``name`` (``nbytes``) keeps one n-th of it: a dynamic-slice
    of nbytes / n, or a fusion that only slices its parameter to that size."""
    uses = users.get(name, [])
    if not uses or n < 2:
        return False
    for use in uses:
        if use.opcode == "dynamic-slice":
            if shape_bytes(use.type_text) * n != nbytes:
                return False
        elif use.opcode == "fusion":
            callee = _CALLEE_RE.search(use.tail)
            if not callee:
                return False
            summary = _fused_summary(module, callee.group(2).strip("{}").lstrip("%"), cache)
            positions = [i for i, operand in enumerate(_operand_names(use)) if operand == name]
            if not positions or any(summary.param_bytes.get(i, nbytes) * n != nbytes for i in positions):
                return False
        else:
            return False
    return True


def _sliced_bytes(module: HloModuleText, instr: _Instr, users: Mapping[str, list[_Instr]], n: int) -> int:
    """Bytes of an all-reduce's results that every device only slices to its own n-th afterwards.

    XLA:CPU has no reduce-scatter: it lowers one as an all-reduce followed by a dynamic-slice (fused
    into the consumer); GPU and TPU compile the same program to a reduce-scatter, which moves half
    the bytes. Results (tuple elements) used any other way count 0.
    """
    cache: dict[str, _Fused] = {}
    elements = _top_level_elements(instr.type_text)
    if not instr.type_text.strip().startswith("("):
        return shape_bytes(instr.type_text) if _only_sliced(module, instr.name, shape_bytes(instr.type_text),
                                                            users, n, cache) else 0
    total = 0
    for use in users.get(instr.name, []):
        if use.opcode != "get-tuple-element":
            return 0
        index = re.search(r"index=(\d+)", use.tail)
        if not index:
            continue
        nbytes = shape_bytes(elements[int(index.group(1))])
        if _only_sliced(module, use.name, nbytes, users, n, cache):
            total += nbytes
    return total


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


# --------------------------------------------------------------------------------------------------
# Replica groups: which devices each collective spans
# --------------------------------------------------------------------------------------------------

_GROUPS_LIST_RE = re.compile(r"replica_groups=(\{(?:\{[\d,\s]*\},?\s*)*\})")
_GROUPS_IOTA_RE = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_GROUPS_MESH_RE = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,\s]*)\))?\s*\{([^}]*)\}")
_MESH_AXIS_RE = re.compile(r"'([^']+)'=(\d+)")
_AXIS_REF_RE = re.compile(r"'([^']+)'(?::\((\d+)\)(\d+))?")
_PAIRS_RE = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")


def _iota(dims: list[int], perm: list[int] | None) -> list[int]:
    """XLA's iota tile assignment ``[dims]T(perm)``: iota(prod dims) reshaped to dims, transposed."""
    import numpy as np

    ids = np.arange(math.prod(dims)).reshape(dims)
    if perm:
        ids = ids.transpose(perm)
    return [int(i) for i in ids.reshape(-1)]


def _mesh_groups(axes_text: str, device_text: str | None, group_text: str) -> list[list[int]]:
    """Groups of XLA's mesh form ``mesh['a'=2,'b'=4], device_ids=([2,4]T(1,0)) {'a'}``: the
    devices along the named axes (or sub-axes ``'a':(pre)size``), the other axes fixed."""
    import numpy as np

    names = [n for n, _ in _MESH_AXIS_RE.findall(axes_text)]
    sizes = [int(s) for _, s in _MESH_AXIS_RE.findall(axes_text)]
    n = math.prod(sizes)
    if device_text:
        found = re.fullmatch(r"\s*\[([\d,]+)\](?:T\(([\d,]+)\))?\s*", device_text)
        if found:
            perm = [int(p) for p in found.group(2).split(",")] if found.group(2) else None
            devices = _iota([int(d) for d in found.group(1).split(",")], perm)
        else:
            devices = [int(d) for d in re.findall(r"\d+", device_text)]
    else:
        devices = list(range(n))
    # Split every mesh axis into the factors its sub-axes name: 'a':(pre)size splits a into
    # [pre, size, rest] and groups over the middle factor.
    refs = [(name, int(pre) if pre else None, int(size) if size else None)
            for name, pre, size in _AXIS_REF_RE.findall(group_text)]
    factors: list[int] = []
    grouped: list[int] = []
    for name, size in zip(names, sizes):
        subs = sorted((pre, sz) for ref, pre, sz in refs if ref == name and pre is not None)
        if any(ref == name and pre is None for ref, pre, _ in refs):
            grouped.append(len(factors))
            factors.append(size)
            continue
        done = 1
        for pre, sz in subs:
            if pre > done:
                factors.append(pre // done)
                done = pre
            grouped.append(len(factors))
            factors.append(sz)
            done *= sz
        if done < size:
            factors.append(size // done)
    order = [i for i in range(len(factors)) if i not in grouped] + grouped
    arr = np.asarray(devices).reshape(factors).transpose(order)
    per_group = math.prod(factors[i] for i in grouped)
    return [[int(d) for d in g] for g in arr.reshape(-1, per_group)]


def replica_groups(tail: str) -> list[list[int]] | None:
    """The device groups of a collective from its attributes (the text after the opcode): partition
    ids (= positions in the mesh's flattened device list) in every group. Understands the three
    forms XLA prints: explicit ``{{0,1},{2,3}}``, iota ``[2,4]<=[4,2]T(1,0)`` and mesh
    ``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``; a collective-permute's ``source_target_pairs``
    give one group per connected pair. None when none is found (empty groups: all devices)."""
    found = _GROUPS_MESH_RE.search(tail)
    if found:
        return _mesh_groups(found.group(1), found.group(2), found.group(3))
    found = _GROUPS_IOTA_RE.search(tail)
    if found:
        count, size = int(found.group(1)), int(found.group(2))
        perm = [int(p) for p in found.group(4).split(",")] if found.group(4) else None
        ids = _iota([int(d) for d in found.group(3).split(",")], perm)
        return [ids[i * size:(i + 1) * size] for i in range(count)]
    found = _GROUPS_LIST_RE.search(tail)
    if found:
        groups = [[int(x) for x in g.split(",") if x.strip()] for g in re.findall(r"\{([\d,\s]*)\}",
                                                                                  found.group(1)[1:-1])]
        return [g for g in groups if g] or None
    found = _PAIRS_RE.search(tail)
    if found:
        pairs = [tuple(int(x) for x in p.split(",")) for p in re.findall(r"\{(\d+,\d+)\}", found.group(1))]
        return [list(p) for p in pairs if p[0] != p[1]] or [[pairs[0][0]]] if pairs else None
    return None


# --------------------------------------------------------------------------------------------------
# Per-op cost: FLOPs and memory traffic of every op the program runs
# --------------------------------------------------------------------------------------------------

# Ops that move no data of their own: views, tuples, control flow (its callees are counted),
# collectives (their traffic is the collective's), async bookkeeping.
_FREE_OPS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id", "replica-id",
    "after-all", "while", "call", "conditional", "opt-barrier", "add-dependency", "domain",
    "copy-done", "async-start", "async-update", "async-done", "send-done", "recv-done",
}
# Callers whose ``to_apply`` is a scalar function applied inside the op (not ops of their own).
_APPLY_CALLERS = {"reduce", "reduce-window", "scatter", "sort", "map", "select-and-scatter",
                  "all-reduce", "all-reduce-start", "reduce-scatter", "custom-call"}
_SLICERS = ("dynamic-slice", "slice", "gather")
TRANSCENDENTAL = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic", "rsqrt", "sqrt",
                  "cbrt", "power", "erf", "sine", "cosine", "tan", "atan2"}


@dataclasses.dataclass
class OpCost:
    """One op of the program, per execution on one device: dot FLOPs (2 per multiply-add), bytes
    read and written in device memory, the dots' input dtype ("" without dots), executions per step."""

    name: str
    opcode: str
    flops: float
    bytes: int
    executions: int
    dtype: str
    op_name: str = ""
    transcendentals: int = 0  # elements of exp / log / tanh / ... the op computes
    # "": every backend runs it; "cpu": inside a rolled random-bits loop, which only XLA:CPU emits;
    # "accelerator": that loop as one pass writing its bits, as GPU and TPU compile it (``op_costs``).
    backend: str = ""


def _operand_names(instr: _Instr) -> list[str]:
    """Operand names of an instruction (the ``%x`` inside its first parentheses)."""
    depth, end = 1, len(instr.tail)
    for i, ch in enumerate(instr.tail):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            end = i
            break
    return _OPERAND_RE.findall(instr.tail[:end])


def _dot_flops(instr: _Instr, shapes: Mapping[str, str]) -> float:
    lhs = _operand_names(instr)
    if not lhs or lhs[0] not in shapes:
        return 0.0
    lhs_dims = _dims(shapes[lhs[0]])
    contract = _CONTRACT_RE.search(instr.tail)
    k = 1
    for i in (contract.group(1).split(",") if contract else []):
        if i.strip():
            k *= lhs_dims[int(i)]
    return 2.0 * math.prod(_dims(instr.type_text)) * k


def _first_dtype(type_text: str) -> str:
    found = _ARRAY_RE.search(type_text)
    return found.group(1) if found else ""


@dataclasses.dataclass
class _Fused:
    """What a fused computation does, seen from the fusion op that calls it."""

    flops: float
    dtype: str
    param_bytes: dict[int, int]  # parameter number -> bytes the fusion reads of it (slices only)
    inplace: dict[int, int]  # parameter number -> bytes written into it in place (dynamic-update-slice)
    transcendentals: int = 0


def _fused_summary(module: HloModuleText, comp: str, cache: dict[str, _Fused]) -> _Fused:
    if comp in cache:
        return cache[comp]
    instrs = module.computations.get(comp, [])
    shapes = {i.name: i.type_text for i in instrs}
    params: dict[str, int] = {}
    for i in instrs:
        if i.opcode == "parameter":
            found = re.match(r"\s*(\d+)", i.tail)
            if found:
                params[i.name] = int(found.group(1))
    users: dict[str, list[_Instr]] = collections.defaultdict(list)
    for i in instrs:
        for operand in _operand_names(i):
            users[operand].append(i)
    flops, dtype, transcendentals = 0.0, "", 0
    for i in instrs:
        if i.opcode in ("dot", "convolution"):
            flops += _dot_flops(i, shapes)
            ops = _operand_names(i)
            dtype = dtype or (_first_dtype(shapes[ops[0]]) if ops and ops[0] in shapes else "")
        elif i.opcode in TRANSCENDENTAL:
            transcendentals += math.prod(_dims(i.type_text))
        for attr, value in _CALLEE_RE.findall(i.tail):
            if i.opcode == "fusion" and attr == "calls":
                inner = _fused_summary(module, value.strip("{}").lstrip("%"), cache)
                flops += inner.flops
                dtype = dtype or inner.dtype
                transcendentals += inner.transcendentals
    param_bytes: dict[int, int] = {}
    inplace: dict[int, int] = {}
    for name, number in params.items():
        uses = users.get(name, [])
        if uses and all(u.opcode in _SLICERS and _operand_names(u)[:1] == [name] for u in uses):
            param_bytes[number] = sum(shape_bytes(u.type_text) for u in uses)
        dus = [u for u in uses if u.opcode == "dynamic-update-slice" and _operand_names(u)[:1] == [name]]
        if dus and len(dus) == len(uses):
            update = sum(shape_bytes(shapes.get(_operand_names(u)[1], "")) for u in dus
                         if len(_operand_names(u)) > 1)
            inplace[number] = update
    cache[comp] = _Fused(flops, dtype, param_bytes, inplace, transcendentals)
    return cache[comp]


def op_costs(hlo_text: str) -> list[OpCost]:
    """Every op the program runs on one device, with its cost per execution and its executions.

    FLOPs: the dots (and convolutions) of the op, fused ones included, 2 per multiply-add. Bytes:
    what the op reads and writes in device memory, as a roofline counts it (fused intermediates
    stay on chip): its result plus its operands, except that an operand the fusion only slices
    counts the slices it reads, and a buffer updated in place (``dynamic-update-slice``, the way a
    ``scan`` writes its stacked outputs) counts the update, read and written. Views, tuples,
    control flow and collectives count nothing (a collective's cost is its transfer). Executions:
    loop bodies x their trip counts, as ``collective_stats`` counts them.
    """
    module = parse_hlo_module(hlo_text)
    fused: set[str] = set()
    applied: set[str] = set()
    for instrs in module.computations.values():
        for instr in instrs:
            for attr, value in _CALLEE_RE.findall(instr.tail):
                names = [n.strip().lstrip("%") for n in value.strip("{}").split(",") if n.strip()]
                if instr.opcode == "fusion" and attr == "calls":
                    fused.update(names)
                elif attr in ("to_apply", "called_computations") and instr.opcode in _APPLY_CALLERS:
                    applied.update(names)
    own = {comp: sum(op.size for op in _collective_ops(instrs)) for comp, instrs in module.computations.items()}
    mult, _, _ = _multiplicities(module, own)
    rng_loops = _rng_loop_computations(module)
    cache: dict[str, _Fused] = {}
    out: list[OpCost] = []
    for comp, instrs in module.computations.items():
        m = mult.get(comp, 0)
        if not m or comp in fused or comp in applied:
            continue
        shapes = {instr.name: instr.type_text for instr in instrs}
        backend = "cpu" if comp in rng_loops else ""
        for instr in instrs:
            kind, _ = _kind(instr.opcode)
            if instr.opcode == "while" and not backend and _is_rng_loop(instr):
                found = _OP_NAME_RE.search(instr.tail)
                out.append(OpCost(instr.name, "rng-loop", 0.0, shape_bytes(instr.type_text), m, "",
                                  found.group(1) if found else "", backend="accelerator"))
            if instr.opcode in _FREE_OPS or kind is not None:
                continue
            operands = _operand_names(instr)
            sizes = [shape_bytes(shapes[o]) if o in shapes else 0 for o in operands]
            result = shape_bytes(instr.type_text)
            flops, dtype, transcendentals = 0.0, "", 0
            if instr.opcode in TRANSCENDENTAL:
                transcendentals = math.prod(_dims(instr.type_text))
            if instr.opcode in ("dot", "convolution"):
                flops = _dot_flops(instr, shapes)
                dtype = _first_dtype(shapes.get(operands[0], "")) if operands else ""
                nbytes = result + sum(sizes)
            elif instr.opcode == "fusion":
                callee = _CALLEE_RE.search(instr.tail)
                summary = _fused_summary(module, callee.group(2).strip("{}").lstrip("%"), cache) if callee else None
                nbytes = result
                if summary is not None:
                    flops, dtype, transcendentals = summary.flops, summary.dtype, summary.transcendentals
                    for i, size in enumerate(sizes):
                        if i in summary.inplace:
                            nbytes += 2 * summary.inplace[i] - (size if size == result else 0)
                        else:
                            nbytes += summary.param_bytes.get(i, size)
                    nbytes = max(nbytes, 0)
                else:
                    nbytes += sum(sizes)
            elif instr.opcode in _SLICERS:
                nbytes = 2 * result
            elif instr.opcode == "dynamic-update-slice":
                nbytes = 2 * (sizes[1] if len(sizes) > 1 else result)
            elif instr.opcode in ("iota", "rng-bit-generator", "rng"):
                nbytes = result
            else:
                nbytes = result + sum(sizes)
            found = _OP_NAME_RE.search(instr.tail)
            out.append(OpCost(instr.name, instr.opcode, flops, nbytes, m, dtype, found.group(1) if found else "",
                              transcendentals, backend))
    return out


# JAX lowers threefry2x32 on CPU with rolled loops (jax/_src/prng.py, ``use_rolled_loops=True`` for
# the cpu platform, to keep compiles short) and unrolled on GPU and TPU, where the rounds fuse into
# one elementwise kernel. The loops carry the JAX function that drew the bits in their op_name.
_RNG_LOOP_RE = re.compile(r"jit\((?:_uniform|_threefry\w*|_randint|_gumbel|_bernoulli|_random_bits|_normal\w*)\)/"
                          r"(?:[^/]*/)*while$")


def _is_rng_loop(instr: _Instr) -> bool:
    found = _OP_NAME_RE.search(instr.tail)
    return bool(found and _RNG_LOOP_RE.search(found.group(1)))


def _rng_loop_computations(module: HloModuleText) -> set[str]:
    """Computations that run inside a rolled random-bits loop (its body and condition, and what
    they call)."""
    todo = []
    for instrs in module.computations.values():
        for instr in instrs:
            if instr.opcode == "while" and _is_rng_loop(instr):
                todo += [call.callee for call in _calls(instr)]
    seen: set[str] = set()
    while todo:
        comp = todo.pop()
        if comp in seen or comp not in module.computations:
            continue
        seen.add(comp)
        todo += [call.callee for instr in module.computations[comp] for call in _calls(instr)]
    return seen
