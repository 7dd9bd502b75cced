"""A shard study's results: one ``StrategyResult`` per mesh, and the table, CSV, JSON, Markdown, PNG."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib
from rich.console import Console
from rich.table import Table

from jaxdistil.study.cost import StepCost
from jaxdistil.study.hlo import COLLECTIVES, CollectiveStats
from jaxdistil.study.predict import Prediction, fmt_range
from jaxdistil.training.sharding import MESH_AXES

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


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
    cost: StepCost | None = None  # what one step costs each device (study.cost)
    predictions: list[Prediction] = dataclasses.field(default_factory=list)  # one per --predict target

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
        if self.cost is not None:
            row.update(hbm_bytes_per_device=self.cost.hbm_bytes, needed_bytes_per_device=self.cost.needed_bytes)
            for axes, kinds in self.cost.wire_bytes().items():
                row[f"wire_bytes_{axes}"] = sum(kinds.values())
        for p in self.predictions:
            row.update(p.flat(f"predict_{p.target}"))
        return row

    def to_json(self) -> dict[str, Any]:
        out = self.flat()
        out.update(
            sizes=self.sizes, memory=self.memory, step_times_s=self.step_times_s, losses=self.losses,
            collectives={"count": self.collectives.count, "bytes": self.collectives.bytes,
                         "static_count": self.collectives.static_count,
                         "largest": [_short(op) for op in self.collectives.largest(20)],
                         "in_loops": [_short(op) for op in self.collectives.in_loops()]},
            notes=self.notes,
        )
        if self.cost is not None:
            out["cost"] = self.cost.summary()
        out["predictions"] = [p.to_json() for p in self.predictions]
        return out


def _short(op: Mapping[str, Any]) -> dict[str, Any]:
    """A collective op for the JSON: its first replica group instead of all of them."""
    groups = op.get("groups") or []
    return {**{k: v for k, v in op.items() if k != "groups"}, "group": groups[0] if groups else None}


def check_agreement(results: list[StrategyResult], tolerance: float) -> bool:
    """Sets ``loss_delta`` / ``loss_agrees`` against the first strategy; True when all agree.

    Agreement: |loss - loss_ref| <= tolerance * max(1, |loss_ref|), i.e. absolute below a loss of
    1 and relative above it (float32 sums in a different order differ in the last bits).
    """
    ran = [r for r in results if r.losses]  # compiled-only strategies (--steps 0) have no loss
    if not ran:
        return True
    ref = ran[0].loss
    bound = tolerance * max(1.0, abs(ref))
    ok = True
    for res in ran:
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


PREDICTION_COLUMNS = ("mesh", "target", "devices as", "step ms", "tokens/s", "MFU", "fused ms", "MFU fused",
                      "collectives ms", "memory/dev", "fits", "bound")


def _targets(results: list[StrategyResult]) -> list[str]:
    return list(dict.fromkeys(p.target for r in results for p in r.predictions))


def _num(value: float, spec: str) -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


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
            f"{r.compile_s:.1f}", _num(r.step_s * 1e3, ".0f"), _num(r.tokens_per_s, ",.0f"),
            _num(r.loss, ".6f"), ("n/a" if r.loss_delta is None else f"{r.loss_delta:+.1e}") + agree,
        ])
    return rows


def prediction_rows(results: list[StrategyResult]) -> list[list[str]]:
    """The prediction table (one row per strategy and --predict target, ``PREDICTION_COLUMNS``):
    times, tokens/s and MFU as 'no overlap–full overlap' ranges of compute and collectives."""
    rows = []
    for r in results:
        for p in r.predictions:
            if p.refused:
                rows.append([r.mesh, p.target, "not predicted", *["n/a"] * (len(PREDICTION_COLUMNS) - 3)])
                continue
            fits = "n/a" if p.fits is None else ("yes" if p.fits else "NO")
            memory = f"{fmt_bytes(p.needed_bytes)} of {fmt_bytes(p.capacity_bytes)}"
            rows.append([
                r.mesh, p.target, p.layout, fmt_range(p.step_s_overlap, p.step_s_serial, 1e3),
                fmt_range(p.tokens_per_s_serial, p.tokens_per_s_overlap),
                fmt_range(p.mfu_serial, p.mfu_overlap, 100) + "%", fmt_range(p.step_s_fused, p.step_s_fused, 1e3),
                fmt_range(p.mfu_fused, p.mfu_fused, 100) + "%", f"{p.collective_s * 1e3:.3g}", memory, fits, p.bound,
            ])
    return rows


def prediction_notes(results: list[StrategyResult]) -> list[str]:
    """Lines under the prediction table: the model behind it, refusals and what it flags."""
    lines = []
    models = dict.fromkeys(p.model for r in results for p in r.predictions)
    if models:
        lines.append(f"model {', '.join(models)} (docs/sharding-study.md): step ms, tokens/s and MFU from full to no "
                     "overlap of compute and collectives, for the program as XLA:CPU fused it; fused: if every "
                     "elementwise op were fused into the matmuls")
    for r in results:
        for p in r.predictions:
            for note in ([p.refused] if p.refused else []) + p.notes:
                lines.append(f"{r.mesh} on {p.target}: {note}")
    return lines


def _rich_table(columns: Sequence[str], rows: list[list[str]], title: str = "") -> Table:
    table = Table(title=title or None, show_lines=False)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=i == 0)
    for row in rows:
        table.add_row(*row)
    return table


def print_table(results: list[StrategyResult], title: str = "", file: Any = None) -> None:
    """The table on the terminal (rich), and the prediction table when there are predictions."""
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=320)  # a log file: no wrapping into a narrow column
    console.print(_rich_table(TABLE_COLUMNS, table_rows(results), title))
    if _targets(results):
        console.print(_rich_table(PREDICTION_COLUMNS, prediction_rows(results), "predicted"))


def _markdown(columns: Sequence[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join([":---"] + ["---:"] * (len(columns) - 1)) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def markdown_table(results: list[StrategyResult]) -> str:
    """The same table(s) as GitHub Markdown (what the README shows), prediction notes under them."""
    lines = _markdown(TABLE_COLUMNS, table_rows(results))
    if _targets(results):
        lines += ["", *_markdown(PREDICTION_COLUMNS, prediction_rows(results)), ""]
        lines += [f"* {n}" for n in prediction_notes(results)]
    return "\n".join(lines) + "\n"


def write_csv(results: list[StrategyResult], path: Any) -> None:
    flat = [r.flat() for r in results]
    fields = list(dict.fromkeys(k for row in flat for k in row)) or ["mesh"]  # meshes differ in axes
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
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
    names = [r.mesh for r in results]
    x = list(range(len(results)))
    mib = 1024.0**2
    targets = _targets(results)
    panels = 3 if targets else 2
    fig, axes = plt.subplots(1, panels, figsize=(max(8, 1.6 * len(results) + 6) * panels / 2, 4.8))
    ax_mem, ax_coll = axes[0], axes[1]
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
    if targets:
        _prediction_panel(axes[2], results, targets)
    for ax in axes:
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


def _prediction_panel(ax: Any, results: list[StrategyResult], targets: list[str]) -> None:
    """Predicted step time per mesh and target: bars at full overlap, a line up to no overlap; a
    hatched bar where the step does not fit the device's memory."""
    width = 0.8 / len(targets)
    for j, target in enumerate(targets):
        xs, low, high, fused, hatches = [], [], [], [], []
        for i, r in enumerate(results):
            p = next((p for p in r.predictions if p.target == target and not p.refused), None)
            if p is None or p.step_s_overlap is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            low.append(p.step_s_overlap * 1e3)
            high.append(p.step_s_serial * 1e3)
            fused.append(p.step_s_fused * 1e3)
            hatches.append("xx" if p.fits is False else None)
        bars = ax.bar(xs, low, width=width, label=target)
        for bar, h in zip(bars, hatches):
            bar.set_hatch(h)
        ax.vlines(xs, low, high, colors="black", linewidth=1)
        ax.scatter(xs, fused, marker="_", s=300, color="black", zorder=3, label="fused" if j == 0 else None)
    ax.set_title("predicted step (bar: full overlap, line: none, dash: fused; xx: does not fit)", fontsize="small")
    ax.set_ylabel("ms")
