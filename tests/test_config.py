"""The configuration machinery (jaxdistil.config): shipped configs found by name or by their source
path from any directory, YAML errors in one line, sections built from plain data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from jaxdistil.config import (
    LoggingConfig,
    build_section,
    dump_config,
    read_yaml,
    resolve_config,
    shipped_config_names,
    shipped_configs,
)
from jaxdistil.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def test_every_config_of_the_source_tree_ships(monkeypatch, tmp_path):
    on_disk = sorted(str(p.relative_to(REPO / "configs").with_suffix("")) for p in (REPO / "configs").rglob("*.yaml"))
    assert shipped_config_names() == on_disk and "finetune/glue" in on_disk
    monkeypatch.chdir(tmp_path)  # not the source tree: names and source paths still resolve
    for name in on_disk:
        want = shipped_configs() / f"{name}.yaml"
        assert resolve_config(name) == want and resolve_config(f"configs/{name}.yaml") == want
        assert read_yaml(name) == read_yaml(want)


def test_a_file_that_exists_wins_over_a_shipped_name(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path("tiny").write_text("run_dir: mine\n")
    assert read_yaml("tiny") == {"run_dir": "mine"}


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"config file .*nope.yaml does not exist; .*shipped config by name \(demo, "):
        read_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="is not valid YAML at line"):
        read_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        read_yaml(tmp_path / "list.yaml")


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    sizes: tuple[int, ...] = (1,)


def test_build_section_types_and_unknown_keys(tmp_path):
    cfg = build_section(Outer, {"logging": {"peak_tflops": 2}, "sizes": "1,2,3"})
    assert cfg.logging.peak_tflops == 2.0 and cfg.sizes == (1, 2, 3)
    with pytest.raises(UserError, match=r"unknown config key 'logging.colour'; valid keys of logging: peak_tflops"):
        build_section(Outer, {"logging": {"colour": True}})
    with pytest.raises(UserError, match="config key 'logging.progress' should be bool, got 'yes'"):
        build_section(Outer, {"logging": {"progress": "yes"}})
    dump_config(cfg, tmp_path / "out.yaml")
    assert build_section(Outer, read_yaml(tmp_path / "out.yaml")) == cfg
