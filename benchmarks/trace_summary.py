"""Where a compiled step spends its time: a ``jax.profiler`` trace summed per XLA op.

``jax.profiler.trace(dir, create_perfetto_trace=True)`` writes ``perfetto_trace.json.gz``: Chrome
trace events, among them one per executed XLA op (its ``args`` carry ``hlo_module`` and
``hlo_op``): GPU kernels on the ``/device:GPU:N`` tracks, thunks on the CPU client's threads. This
module sums them per op and labels each op from the compiled program's text (``compiled.as_text()``):

* kind: what the op computes: ``matmul`` (a dot, a cuBLAS / Triton GEMM, or a fusion around one),
  ``attention`` (cuDNN fused attention), ``collective``, ``reduction`` (a fusion with a reduce:
  softmax, layer norm, loss sums), ``elementwise`` (other fusions: GELU, dropout, AdamW), ``copy``;
* where: the model and method the op came from (``DistilBertForMaskedLM.encode``, ``.mlm_logits``)
  or the step's named scope (``loss``, ``masking``, ``optimizer``), and whether it is the forward
  or the backward pass (``transpose(jvp(...))`` in the op's name); ``other`` for the rest (metrics,
  gradient norms), ``unattributed`` for ops XLA made without a name.

Containers (``while``, ``conditional``, ``call``) are skipped: their ops are traced themselves.

  python benchmarks/trace_summary.py TRACE_DIR HLO_TEXT_FILE [--steps N]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from jaxdistil.study.hlo import parse_hlo_module

_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
_CALLS_RE = re.compile(r"calls=%?([\w.\-]+)")
_TARGET_RE = re.compile(r'custom_call_target="([^"]*)"')
_MODEL_RE = re.compile(r"(\w+For\w+|\w+Model)\.(\w+)")
_SCOPES = ("loss", "masking", "optimizer")
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done", "async-update"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def trace_file(trace_dir: str | Path) -> Path:
    found = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}; trace with "
                                "jax.profiler.trace(dir, create_perfetto_trace=True)")
    return found[-1]


def op_events(trace_dir: str | Path) -> list[dict[str, Any]]:
    """The trace's XLA-op events: {module, op, dur_us}. Device tracks (GPU kernels) when the trace
    has them, else the host's thunk events (CPU)."""
    with gzip.open(trace_file(trace_dir), "rt") as f:
        doc = json.load(f)
    events = doc["traceEvents"] if isinstance(doc, dict) else doc
    names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    device = {pid for pid, name in names.items() if name.startswith("/device:")}
    if any(e["pid"] in device for e in ops):
        ops = [e for e in ops if e["pid"] in device]
    return [{"module": e["args"].get("hlo_module", ""), "op": e["args"]["hlo_op"], "dur_us": float(e.get("dur", 0))}
            for e in ops]


def op_labels(hlo_text: str) -> dict[str, dict[str, str]]:
    """Instruction name -> {opcode, kind, where, op_name} for every instruction of the program."""
    module = parse_hlo_module(hlo_text)
    opcodes = {c: {i.opcode for i in instrs} for c, instrs in module.computations.items()}

    def fused_opcodes(instr) -> set[str]:
        found = _CALLS_RE.search(instr.tail)
        return opcodes.get(found.group(1), set()) if found else set()

    labels = {}
    for instrs in module.computations.values():
        for instr in instrs:
            name_match = _OP_NAME_RE.search(instr.tail)
            op_name = name_match.group(1) if name_match else ""
            labels[instr.name] = {"opcode": instr.opcode, "kind": _kind(instr, fused_opcodes),
                                  "where": _where(op_name), "op_name": op_name}
    return labels


def _kind(instr, fused_opcodes) -> str:
    code = instr.opcode
    if code in _CONTAINERS:
        return "container"
    if any(code.startswith(c) for c in _COLLECTIVES):
        return "collective"
    if code == "custom-call":
        target = (_TARGET_RE.search(instr.tail) or [None, ""])[1]
        if "fmha" in target or "attention" in target.lower():
            return "attention"
        if "gemm" in target or "matmul" in target:
            return "matmul"
        return "custom-call"
    if code in ("dot", "convolution"):
        return "matmul"
    if code == "fusion":
        inner = fused_opcodes(instr)
        if "triton_gemm" in instr.tail or inner & {"dot", "convolution"}:
            return "matmul"
        if inner & {"reduce", "reduce-window"}:
            return "reduction"
        return "elementwise"
    if code in ("copy", "transpose", "copy-start", "copy-done", "bitcast"):
        return "copy"
    if code in ("reduce", "reduce-window"):
        return "reduction"
    return "elementwise"


def _where(op_name: str) -> str:
    """The model method or step scope (``loss``, ``masking``, ``optimizer``: named scopes of the
    step) an op came from, forward or backward."""
    if not op_name:
        return "unattributed"
    direction = "backward" if "transpose(" in op_name else "forward"
    found = _MODEL_RE.findall(op_name)
    if found:
        model, method = found[-1]
        return f"{model}.{method} {direction}"
    for scope in _SCOPES:
        if re.search(rf"[(/]{scope}[)/]", op_name):
            return scope if scope in ("masking", "optimizer") else f"{scope} {direction}"
    return "other"


def summarize(events: Iterable[dict[str, Any]], hlo_text: str, steps: int, top: int = 25) -> dict[str, Any]:
    """Per-step time by kind, by where, and the ``top`` ops; events of other modules are ignored."""
    labels = op_labels(hlo_text)
    per_op: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.Counter()
    for e in events:
        if e["op"] in labels and labels[e["op"]]["kind"] != "container":
            per_op[e["op"]] += e["dur_us"]
            calls[e["op"]] += 1
    total = sum(per_op.values())
    by_kind: dict[str, float] = collections.defaultdict(float)
    by_where: dict[str, float] = collections.defaultdict(float)
    for op, us in per_op.items():
        by_kind[labels[op]["kind"]] += us
        by_where[labels[op]["where"]] += us

    def table(d: dict[str, float]) -> list[dict[str, Any]]:
        return [{"name": k, "ms_per_step": round(v / steps / 1e3, 3), "share": round(v / total, 4) if total else 0.0}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])]

    top_ops = [{"op": op, "kind": labels[op]["kind"], "where": labels[op]["where"],
                "ms_per_step": round(us / steps / 1e3, 3), "share": round(us / total, 4) if total else 0.0,
                "calls_per_step": calls[op] / steps, "op_name": labels[op]["op_name"][:160]}
               for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]]
    return {"steps": steps, "op_ms_per_step": round(total / steps / 1e3, 3), "ops_traced": len(per_op),
            "by_kind": table(by_kind), "by_where": table(by_where), "top_ops": top_ops}


def format_summary(summary: dict[str, Any], rows: int = 12) -> str:
    lines = [f"XLA op time {summary['op_ms_per_step']:.1f} ms/step over {summary['ops_traced']} ops"]
    for title, key in (("by kind", "by_kind"), ("by where", "by_where")):
        lines.append(f"  {title}: " + ", ".join(f"{r['name']} {100 * r['share']:.1f}%" for r in summary[key]))
    lines.append("  top ops:")
    for r in summary["top_ops"][:rows]:
        lines.append(f"    {100 * r['share']:5.1f}%  {r['ms_per_step']:8.3f} ms  {r['kind']:11s} {r['where']:40s} {r['op']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace_dir")
    p.add_argument("hlo_text", help="the compiled step's text (compiled.as_text()) in a file")
    p.add_argument("--steps", type=int, default=1, help="steps the trace holds")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    summary = summarize(op_events(args.trace_dir), Path(args.hlo_text).read_text(), args.steps)
    print(format_summary(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
