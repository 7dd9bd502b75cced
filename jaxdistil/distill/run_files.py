"""A distillation run's own files and the checks a run makes against its directory.

Layout: ``RUN/config.yaml`` (the resolved run config), ``RUN/student/config.json`` (the model being
trained), ``RUN/tokenizer/`` (the data's), beside what every run directory holds (checkpoints,
metrics, the lock: ``jaxdistil.training.rundir``). ``check_run_dir`` refuses a run dir made for a
student of another shape; ``write_run_files`` writes the three files.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import yaml

from jaxdistil import distributed
from jaxdistil.config import dump_config, to_dict
from jaxdistil.data import manifest as manifest_lib
from jaxdistil.distill.config import RunConfig
from jaxdistil.errors import UserError
from jaxdistil.hf.files import copy_tokenizer_files
from jaxdistil.models import ModelConfig, load_config, save_config


def shape_summary(model_cfg: ModelConfig) -> str:
    return (
        f"{type(model_cfg).__name__} {model_cfg.layers} layers x {model_cfg.hidden} hidden, "
        f"{model_cfg.heads} heads, FFN {model_cfg.mlp}, vocab {model_cfg.vocab_size}, "
        f"{model_cfg.max_position_embeddings} positions"
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def check_run_dir(run_dir: Path, cfg: RunConfig, student_cfg: ModelConfig) -> None:
    """UserError when RUN was made for a student of another shape; notes other changed settings."""
    saved = run_dir / "student" / "config.json"
    if saved.is_file():
        old = load_config(saved)

        def shape(c):
            return (type(c).__name__, c.layers, c.hidden, c.heads, c.mlp, c.vocab_size,
                    c.max_position_embeddings, c.token_types, c.sinusoidal)

        if shape(old) != shape(student_cfg):
            raise UserError(
                f"run dir {run_dir} was made by another config (its student: {shape_summary(old)}; this "
                f"config's: {shape_summary(student_cfg)}); use a new run_dir or the config that made it"
            )
    old_yaml = run_dir / "config.yaml"
    if old_yaml.is_file() and jax.process_index() == 0:
        before = _flatten(yaml.safe_load(old_yaml.read_text()) or {})
        after = _flatten(to_dict(cfg))
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            print(f"note: resuming {run_dir} with changed settings: {', '.join(changed[:8])}"
                  + (" ..." if len(changed) > 8 else ""), file=sys.stderr)


def write_run_files(run_dir: Path, cfg: RunConfig, student_cfg: ModelConfig, manifest: dict) -> None:
    """RUN/config.yaml, RUN/student/config.json and RUN/tokenizer/ (process 0 only)."""
    if not distributed.is_main_process():
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    save_config(student_cfg, run_dir / "student")
    (run_dir / "tokenizer").mkdir(exist_ok=True)
    copy_tokenizer_files(manifest_lib.tokenizer_dir(manifest), run_dir / "tokenizer")
