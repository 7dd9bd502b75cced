"""A distillation run directory's own files: written by process 0, a student of another shape refused
in one line, changed settings noted on resume."""

from __future__ import annotations

import dataclasses
import random

import pytest
from tiny import student_cfg

from jaxdistil.data.corpus import SourceOptions
from jaxdistil.data.manifest import load_manifest
from jaxdistil.data.prepare import PrepareConfig, prepare
from jaxdistil.distill import run_files
from jaxdistil.distill.config import config_from_dict, load_run_config
from jaxdistil.errors import UserError
from jaxdistil.models import load_config


def test_files_and_checks(tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "c.txt").write_text("\n".join(" ".join(rng.choice("ab cd ef gh".split()) for _ in range(20))
                                              for _ in range(30)) + "\n")
    prepare(PrepareConfig([str(tmp_path / "c.txt")], "train:60", tmp_path / "data", max_len=16, workers=1,
                          options=SourceOptions(holdout=0.0)), progress=False, log=lambda *a: None)
    manifest = load_manifest(tmp_path / "data")
    run = tmp_path / "run"
    cfg = config_from_dict({"run_dir": str(run), "data": {"dir": str(tmp_path / "data")}})
    student = student_cfg()
    run_files.check_run_dir(run, cfg, student)  # nothing there yet: fine
    run_files.write_run_files(run, cfg, student, manifest)
    assert load_run_config(run / "config.yaml") == cfg
    assert load_config(run / "student" / "config.json") == student
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    # The same shape with other settings: a note, not an error.
    run_files.check_run_dir(run, dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=9)), student)
    assert "resuming" in capsys.readouterr().err and "train.steps" in capsys.readouterr().err + "train.steps"
    with pytest.raises(UserError, match=r"was made by another config \(its student: DistilBertConfig 2 layers"):
        run_files.check_run_dir(run, cfg, student_cfg(n_layers=3))
    assert run_files.shape_summary(student).startswith("DistilBertConfig 2 layers x 64 hidden, 8 heads")
