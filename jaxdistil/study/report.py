"""A shard study's results: one ``StrategyResult`` per mesh, and the table, CSV, JSON, Markdown, PNG."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import matplotlib
from rich.console import Console
from rich.table import Table

from jaxdistil.study.hlo import COLLECTIVES, CollectiveStats
from jaxdistil.training.sharding import MESH_AXES

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


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
                         "largest": self.collectives.largest(20), "in_loops": self.collectives.in_loops()},
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
    """The table on the terminal (rich)."""
    rows = table_rows(results)
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
