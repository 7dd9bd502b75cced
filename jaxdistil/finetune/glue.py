"""``glue``: fine-tune and score a model on every task, the paper's table, and the student's retention.

For each model (the student, and the ``compare`` teacher when given) every task is fine-tuned with
the same config (``configs/finetune/glue.yaml`` by default: run_glue's recipe) into
``OUTPUT/<model>/<task>``; each run resumes when the command is run again. The table has one
column per task (its score, ``jaxdistil.finetune.metrics.task_score``) and the macro-score; with a
teacher, a retention row: the student's score / the teacher's, per task and overall (the paper's
97%). Written as ``OUTPUT/glue.json`` and ``OUTPUT/glue.md``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxdistil.errors import UserError
from jaxdistil.finetune.config import load_finetune_config
from jaxdistil.finetune.metrics import macro_score
from jaxdistil.finetune.run import finetune
from jaxdistil.finetune.tasks import GLUE, glue_name

# The paper's column order and names.
DISPLAY = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qnli": "QNLI", "qqp": "QQP", "rte": "RTE",
           "sst2": "SST-2", "stsb": "STS-B", "wnli": "WNLI"}


def _column(task: str) -> str:
    short = glue_name(task)
    return DISPLAY[short] if short else Path(task).stem if "." in task else task.split(":")[-1]


def _label(model: str) -> str:
    path = Path(model)
    return path.name or str(path)


def glue(model: str, tasks: Sequence[str] = tuple(GLUE), output: str | Path = "glue-out",
         compare: str | None = None, config: str | Path | None = None, overrides: Sequence[str] = (),
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fine-tunes ``model`` (and ``compare``) on ``tasks``; returns the report (also written)."""
    if not tasks:
        raise UserError("no task given; pass --tasks cola,sst2,... or builtin:pydocs-topics")
    out = Path(output)
    rows: dict[str, dict[str, Any]] = {}
    models = [("teacher", compare), ("student", model)] if compare else [("model", model)]
    names = [_label(m) for _, m in models]
    if len(set(names)) < len(names):
        names = [f"{role}-{name}" for (role, _), name in zip(models, names)]
    for (role, path), name in zip(models, names):
        scores, details = {}, {}
        for task in tasks:
            run_dir = out / name / _column(task)
            cfg = load_finetune_config(config, [*overrides, f"model={path}", f"task.name={task}", f"run_dir={run_dir}"])
            log(f"== {role} {path}: {task} -> {run_dir}")
            result = finetune(cfg, log=log)
            scores[_column(task)] = result.score
            details[_column(task)] = {"metrics": result.last_eval, "steps": result.step, "run_dir": str(run_dir),
                                      "best_step": result.best_step, "best_score": result.best_score,
                                      "majority_accuracy": result.majority}
        rows[role] = {"model": str(path), "scores": scores, "macro_score": macro_score(scores), "tasks": details}
    report: dict[str, Any] = {"tasks": [_column(t) for t in tasks], "rows": rows}
    if compare:
        t, s = rows["teacher"], rows["student"]
        report["retention"] = {k: s["scores"][k] / t["scores"][k] for k in t["scores"] if t["scores"][k]}
        report["retention"]["macro"] = s["macro_score"] / t["macro_score"] if t["macro_score"] else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    (out / "glue.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "glue.md").write_text(markdown_table(report))
    return report


def markdown_table(report: dict[str, Any]) -> str:
    """The paper's table: one row per model, one column per task, the macro-score first."""
    columns = report["tasks"]
    lines = ["| model | score | " + " | ".join(columns) + " |", "|:---|---:|" + "---:|" * len(columns)]
    for role, row in report["rows"].items():
        cells = [f"{row['scores'][c]:.1f}" for c in columns]
        lines.append(f"| {role} ({Path(row['model']).name}) | {row['macro_score']:.1f} | " + " | ".join(cells) + " |")
    if "retention" in report:
        ret = report["retention"]
        cells = [f"{100 * ret[c]:.1f}%" if c in ret else "n/a" for c in columns]
        lines.append(f"| retention | {100 * ret['macro']:.1f}% | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
