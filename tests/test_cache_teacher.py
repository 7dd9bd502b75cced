"""``jaxdistil cache-teacher`` and ``train teacher.cache=...`` on a tiny run: with every logit in
float32 a cached run logs the online run's losses at every step (the cache's batches and masks are
the run's), it resumes exactly, a top-k cache trains, and a cache that is not the run's is refused
in one line (nothing written lost)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from cli_errors import one_line_error
from tiny_runs import base_config, losses, make_data_dir, make_teacher_dir

from jaxdistil import cli
from jaxdistil.cache_teacher import cache_teacher
from jaxdistil.distill.config import config_from_dict
from jaxdistil.train import train

STEPS = 6


def _with(raw: dict, run_dir, **sections) -> dict:
    out = json.loads(json.dumps(raw))
    out["run_dir"] = str(run_dir)
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """The online reference: the tiny run of tests/test_train.py (the triple loss), 6 steps, and
    its float32 all-logit cache."""
    root = tmp_path_factory.mktemp("cache")
    data = make_data_dir(root)
    raw = base_config(root / "online", data, make_teacher_dir(root / "teacher", data))
    raw["train"].update(steps=STEPS, eval_every=-1)
    raw["checkpoint"].update(every=3)
    train(config_from_dict(raw), log=lambda *a: None)
    full = cache_teacher(config_from_dict(raw), root / "full", top_k=0, dtype="float32", chunk_steps=4,
                         log=lambda *a: None, progress=False)
    return {"raw": raw, "root": root, "losses": losses(root / "online"), "full": full}


def test_bad_writer_arguments_are_refused_before_any_work(tmp_path):
    """Wrong dtype, K, steps or output: one line each, nothing written (no data, no teacher needed)."""
    from jaxdistil.cache_teacher import _prepare_output, needs_hidden
    from jaxdistil.distill.losses import LossConfig
    from jaxdistil.distill.objective import StepConfig
    from jaxdistil.distill.terms import TermConfig
    from jaxdistil.errors import UserError

    cfg = config_from_dict({"teacher": {"model": None}})
    for kwargs, message in (({"dtype": "int8"}, "cache dtype 'int8' is not one of"), ({"top_k": -1}, ">= 0"),
                            ({"steps": 0}, "must be >= 1")):
        with pytest.raises(UserError, match=message):
            cache_teacher(cfg, tmp_path / "c", **kwargs)
    with pytest.raises(UserError, match="has no teacher"):
        cache_teacher(cfg, tmp_path / "c")
    two = config_from_dict({"teacher": {"model": "a"}, "teachers": [{"name": "wide", "model": "b"}]})
    with pytest.raises(UserError, match="this run also has wide"):  # before any model is loaded
        cache_teacher(two, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("")
    with pytest.raises(UserError, match="exists and is not a teacher cache"):
        _prepare_output(tmp_path / "other", {})
    off = LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)
    assert needs_hidden(StepConfig())  # the loss section's L_cos; the terms' outputs are stored per layer
    assert not needs_hidden(StepConfig(loss=off, terms=(TermConfig("kl"), TermConfig("hidden_mse"))))


@pytest.mark.slow
def test_full_cache_run_equals_the_online_run_and_resumes_exactly(online):
    from jaxdistil.data.manifest import load_manifest

    full = online["full"]
    vocab = load_manifest(online["raw"]["data"]["dir"])["tokenizer"]["vocab_size"]
    assert full.steps == STEPS and full.computed == STEPS and full.top_k == vocab
    raw = _with(online["raw"], online["root"] / "cached", teacher={"cache": str(full.path)})
    messages = []
    train(config_from_dict(raw), log=messages.append)
    assert any("not run" in m for m in messages)
    got, want = losses(online["root"] / "cached"), online["losses"]
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6, abs=1e-6), step
    # Resume from step 3: the cache is read from update 3 on, the losses are the same again.
    shutil.rmtree(online["root"] / "cached" / "checkpoints" / str(STEPS))
    train(config_from_dict(raw), log=lambda *a: None)
    again = losses(online["root"] / "cached")
    assert all(again[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6) for s in want)
    # A rerun of the writer keeps every chunk; a longer --steps extends the cache.
    chunks = sorted(p.name for p in full.path.rglob("chunk-*"))
    assert cache_teacher(config_from_dict(online["raw"]), full.path, top_k=0, dtype="float32", chunk_steps=4,
                         log=lambda *a: None, progress=False).computed == 0
    longer = cache_teacher(config_from_dict(online["raw"]), full.path, top_k=0, dtype="float32", chunk_steps=4,
                           steps=STEPS + 2, log=lambda *a: None, progress=False)
    assert longer.computed == 2 and set(chunks) < {p.name for p in full.path.rglob("chunk-*")}


@pytest.mark.slow
def test_top_k_cache_command_trains_and_wrong_caches_are_refused(online, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(online["raw"]))
    assert cli.main(["cache-teacher", "--config", str(config), "--output", str(tmp_path / "k8"), "--top-k", "8",
                     "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"{STEPS} updates (computed now: {STEPS}), top 8 logits" in printed
    per_token = float(printed.split(" bytes per token")[0].rsplit(" ", 1)[1])
    assert per_token < online["full"].bytes_per_token / 5  # 8 of ~230 logits, bf16
    run = tmp_path / "k8-run"
    assert cli.main(["train", "--config", str(config), f"run_dir={run}", f"teacher.cache={tmp_path / 'k8'}"]) == 0
    got = losses(run)
    assert sorted(got) == list(range(1, STEPS + 1)) and all(np.isfinite(v) for v in got.values())
    assert got != online["losses"]  # renormalised top-8 targets, bf16: another loss

    full = str(online["full"].path)
    cases = [
        (["train.seed=1"], "is not of this run: seed is 56 in the cache, 1 in the run"),
        (["train.steps=9"], "the run needs 9; extend it"),
        (["masking.mlm_mask_prop=0.2"], "is not of this run: masking is"),
        (["loader.seed=5"], "is not of this run: loader is"),
    ]
    for i, (overrides, message) in enumerate(cases):
        argv = ["train", "--config", str(config), f"run_dir={tmp_path / f'bad{i}'}", f"teacher.cache={full}", *overrides]
        assert message in one_line_error(capsys, argv)
        assert not (tmp_path / f"bad{i}" / "metrics.jsonl").exists()
    # The full cache has every logit: logits MSE on top of the triple loss trains from it.
    assert cli.main(["train", "--config", str(config), f"run_dir={tmp_path / 'mse'}", f"teacher.cache={full}",
                     "loss.alpha_mse=1.0", "train.steps=2"]) == 0
    k8 = ["train", "--config", str(config), f"run_dir={tmp_path / 'bad-mse'}", f"teacher.cache={tmp_path / 'k8'}",
          "loss.alpha_mse=1.0"]
    assert "needs every teacher logit; the cache has the top 8" in one_line_error(capsys, k8)
    # The writer refuses an output holding another run's cache, or something else; the cache is intact.
    before = {p.name: p.read_bytes() for p in (tmp_path / "k8").rglob("*") if p.is_file()}
    err = one_line_error(capsys, ["cache-teacher", "--config", str(config), "--output", str(tmp_path / "k8"),
                                  "--top-k", "8", "--no-progress", "train.seed=3"])
    assert "holds a teacher cache of another run or kind (seed is 56 in the cache, 3 in this one)" in err
    assert before == {p.name: p.read_bytes() for p in (tmp_path / "k8").rglob("*") if p.is_file()}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    err = one_line_error(capsys, ["cache-teacher", "--config", str(config), "--output", str(tmp_path / "other")])
    assert "exists and is not a teacher cache" in err and (tmp_path / "other" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_cached_hidden_and_attention_terms_equal_the_online_run(online, tmp_path):
    """TinyBERT-style terms (hidden MSE on mapped layers with the embeddings, attention-score MSE) and
    soft targets: the cache stores exactly the teacher layers they read, and the cached run logs the
    online run's losses; the triple loss's cache lacks those layers and is refused in one line."""
    from jaxdistil.errors import UserError

    raw = _with(online["raw"], tmp_path / "online", loss={"alpha_ce": 0.0, "alpha_mlm": 0.0, "alpha_cos": 0.0},
                train={"steps": 4})
    raw["terms"] = [{"kind": "kl", "temperature": 2.0}, {"kind": "mlm_ce"},
                    {"kind": "hidden_mse", "layers": [[0, 0], [1, 2]]}, {"kind": "attention_mse", "layers": [[0, 1]]}]
    train(config_from_dict(raw), log=lambda *a: None)
    made = cache_teacher(config_from_dict(raw), tmp_path / "cache", top_k=0, dtype="float32", log=lambda *a: None,
                         progress=False)
    manifest = json.loads((made.path / "manifest.json").read_text())
    assert manifest["outputs"] == {"hidden_states": [0, 2], "scores": [1]} and manifest["hidden"] is False
    cached = _with(raw, tmp_path / "cached", teacher={"cache": str(made.path)})
    train(config_from_dict(cached), log=lambda *a: None)
    got, want = losses(tmp_path / "cached"), losses(tmp_path / "online")
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert all(got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6) for s in want), (got, want)
    wrong = _with(raw, tmp_path / "wrong", teacher={"cache": str(online["full"].path)})
    with pytest.raises(UserError, match=r"terms\[2\] \(hidden_mse\) reads the teacher's hidden_states of layer 0"):
        train(config_from_dict(wrong), log=lambda *a: None)
