"""Distillation run configs (jaxdistil.distill.config on jaxdistil.config): YAML, key=value overrides,
typed sections, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from jaxdistil import cli
from jaxdistil.config import apply_overrides, to_dict
from jaxdistil.distill.config import RunConfig, config_from_dict, dump_run_config, load_run_config
from jaxdistil.errors import UserError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["distilbert-base-uncased", "distilroberta-base", "distilgpt2", "tiny", "demo",
                                  "teacher-pydocs"])
def test_shipped_configs_load_and_round_trip(name, tmp_path):
    cfg = load_run_config(CONFIGS / f"{name}.yaml")
    assert isinstance(cfg, RunConfig)
    dump_run_config(cfg, tmp_path / "resolved.yaml")
    assert load_run_config(tmp_path / "resolved.yaml") == cfg


def test_paper_recipe():
    cfg = load_run_config(CONFIGS / "distilbert-base-uncased.yaml")
    assert cfg.teacher.model == "bert-base-uncased"
    assert cfg.student.init == "teacher" and cfg.student.layers == (0, 2, 4, 7, 9, 11)
    # The triple loss as terms (the loss section's alphas 0: nothing counts twice).
    assert (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_cos, cfg.loss.alpha_mse) == (0, 0, 0, 0)
    assert [(t.kind, t.weight) for t in cfg.terms] == [("kl", 5.0), ("mlm_ce", 2.0), ("hidden_cos", 1.0)]
    assert cfg.terms[0].temperature == 2.0 and cfg.terms[0].rows == "all" and cfg.terms[2].layers is None
    assert (cfg.optim.learning_rate, cfg.optim.warmup_prop, cfg.optim.max_grad_norm) == (5e-4, 0.05, 5.0)
    assert (cfg.optim.b1, cfg.optim.b2, cfg.optim.eps, cfg.optim.weight_decay) == (0.9, 0.98, 1e-6, 0.0)
    assert cfg.train.epochs == 3 and cfg.train.steps == 0 and cfg.train.seed == 56
    assert 3500 <= cfg.loader.batch_size <= 4500  # about 4K sequences per update
    assert cfg.masking.mlm_mask_prop == 0.15 and cfg.masking.mlm_smoothing == 0.7


def test_overrides_and_types():
    cfg = config_from_dict(
        {},
        [
            "train.steps=20",
            "optim.learning_rate=5e-4",
            "student.layers=0,3",
            "teacher.model=null",
            "loader.buckets=[16, 32]",
            "mesh.rules=mlp=tensor",
            "distributed=none",
            "student.config.dim=64",
            "loss.chunk_rows=null",
            "train.epochs=1",
        ],
    )
    assert cfg.train.steps == 20 and cfg.optim.learning_rate == 5e-4  # "5e-4" is a string to PyYAML
    assert cfg.student.layers == (0, 3) and cfg.teacher.model is None
    assert cfg.loader.buckets == (16, 32) and cfg.mesh.rules == ("mlp=tensor",)
    assert cfg.distributed.mode == "none" and cfg.student.config == {"dim": 64}
    assert cfg.loss.chunk_rows is None and cfg.train.epochs == 1.0
    # Nested YAML data and an override of a string-valued section shorthand.
    cfg = config_from_dict({"distributed": "auto"}, ["distributed.process_id=1"])
    assert cfg.distributed.mode == "auto" and cfg.distributed.process_id == 1
    assert to_dict(cfg)["student"]["layers"] == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize(
    "data, overrides, key",
    [
        ({"train": {"stepz": 1}}, [], "train.stepz"),
        ({"trian": {}}, [], "trian"),
        ({}, ["optim.lr=0.1"], "optim.lr"),
        ({"student": {"config": {"dimm": 3}}}, [], "student.config.dimm"),
        ({}, ["student.config.dropout=high"], "student.config.dropout"),
        ({"train": {"steps": "ten"}}, [], "train.steps"),
        ({"train": {"steps": True}}, [], "train.steps"),
        ({"student": {"layers": ["a"]}}, [], "student.layers"),
        ({"loader": {"shuffle": "yes"}}, [], "loader.shuffle"),
        ({"train": 3}, [], "train"),
        ({}, ["train.steps.x=1"], "train.steps"),
    ],
)
def test_errors_name_the_key(data, overrides, key):
    with pytest.raises(UserError) as err:
        config_from_dict(data, overrides)
    assert key in str(err.value) and "\n" not in str(err.value)


def test_section_checks_are_prefixed():
    with pytest.raises(UserError, match="word_mask"):
        config_from_dict({"masking": {"word_mask": 0.5}})
    with pytest.raises(UserError, match="train.dtype"):
        config_from_dict({"train": {"dtype": "float64"}})
    with pytest.raises(UserError, match="key=value"):
        apply_overrides({}, ["train.steps"])


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_run_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="mapping"):
        load_run_config(tmp_path / "list.yaml")
    (tmp_path / "empty.yaml").write_text("")
    assert load_run_config(tmp_path / "empty.yaml") == RunConfig()


def test_cli_reports_unknown_key_in_one_line(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("train:\n  steps: 3\n  colour: blue\n")
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown config key 'train.colour'")
    assert cli.main(["train", "--config", str(tmp_path / "c.yaml"), "train.colour=red"]) == 2
    assert "train.colour" in capsys.readouterr().err


def test_group_normalisation_refuses_packed_rows(tmp_path, capsys):
    """Groups are loader.group_rows rows; packed rows hold several sequences each, so loss.normalize=group
    would no longer average the reference's micro-batches: refused in one line naming the fix, both
    when set by hand and on the shipped recipe (packed by default)."""
    with pytest.raises(UserError) as err:
        config_from_dict({}, ["loader.packed=true", "loader.batch_size=40", "loader.group_rows=5", "loss.normalize=group"])
    message = str(err.value)
    assert "\n" not in message and "loss.normalize=group" in message and "loader.packed=true" in message
    assert "set loader.packed=false" in message
    with pytest.raises(UserError, match="loader.packed=false"):
        load_run_config(CONFIGS / "distilbert-base-uncased.yaml",
                        ["loader.batch_size=2000", "loader.group_rows=5", "loss.normalize=group"])
    # The command of docs/numerics.md, with its loader.packed=false, loads.
    cfg = load_run_config(CONFIGS / "distilbert-base-uncased.yaml", [
        "loader.batch_size=2000", "loader.packed=false", "loader.group_rows=5", "loss.normalize=group"])
    assert cfg.loss.normalize == "group" and not cfg.loader.packed
    # Through the command line: exit 2, one line, nothing written.
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(CONFIGS / "distilbert-base-uncased.yaml"), f"run_dir={run}",
                     "loader.batch_size=2000", "loader.group_rows=5", "loss.normalize=group"]) == 2
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert len(err_lines) == 1 and err_lines[0].startswith("error: loss.normalize=group")
    assert not run.exists()
