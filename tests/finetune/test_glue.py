"""``glue --compare``: every task for a model and a teacher, the paper's table."""

from __future__ import annotations

import json

import pytest
from classifiers import csv_task, hf_model

from jaxdistil import cli

torch = pytest.importorskip("torch")


@pytest.mark.slow
def test_glue_command_compares_teacher_and_student(tmp_path, capsys):
    task = csv_task(tmp_path)
    teacher = hf_model(tmp_path / "teacher", "BertForMaskedLM")
    student = hf_model(tmp_path / "student", "DistilBertForMaskedLM")
    out = tmp_path / "glue"
    assert cli.main(["glue", "--model", str(student), "--compare", str(teacher), "--tasks", str(task),
                     "--output", str(out), "train.steps=4", "train.batch_size=8", "train.max_len=16",
                     "logging.peak_tflops=1", "logging.progress=false"]) == 0
    report = json.loads((out / "glue.json").read_text())
    assert set(report["rows"]) == {"teacher", "student"} and report["tasks"] == ["task"]
    s, t = report["rows"]["student"], report["rows"]["teacher"]
    assert report["retention"]["task"] == pytest.approx(s["scores"]["task"] / t["scores"]["task"])
    table = (out / "glue.md").read_text()
    assert "| retention |" in table and "| student (student) |" in table


def test_markdown_table_from_a_report():
    from jaxdistil.finetune.glue import markdown_table

    report = {"tasks": ["cola", "sst2"], "retention": {"cola": 0.5, "sst2": 0.9, "macro": 0.75},
              "rows": {"teacher": {"model": "runs/t", "scores": {"cola": 40.0, "sst2": 90.0}, "macro_score": 65.0},
                       "student": {"model": "x/s", "scores": {"cola": 20.0, "sst2": 81.0}, "macro_score": 50.5}}}
    assert markdown_table(report).splitlines() == [
        "| model | score | cola | sst2 |", "|:---|---:|---:|---:|", "| teacher (t) | 65.0 | 40.0 | 90.0 |",
        "| student (s) | 50.5 | 20.0 | 81.0 |", "| retention | 75.0% | 50.0% | 90.0% |"]
