"""Behaviour unchanged across refactors: a fixed tiny distillation run against its recording.

``tests/fixtures/golden_run.py`` builds the run from fixed inputs; ``tests/fixtures/golden/`` holds what the
code of the recording wrote: the per-step losses and metrics (``metrics.jsonl``) and the run's
checkpoints (``run/``). On the CPU model and JAX version of the recording the losses must be equal
bit for bit; elsewhere (other CPUs round matmuls differently) within 1e-5.
"""

from __future__ import annotations

import json
import shutil

import golden_run  # tests/fixtures/ is on pytest's pythonpath (pyproject.toml)
import jax
import numpy as np
import pytest

from jaxdistil.distill.config import config_from_dict  # noqa: E402
from jaxdistil.hf import load_model  # noqa: E402
from jaxdistil.train import train  # noqa: E402

RECORDED = [json.loads(line) for line in (golden_run.GOLDEN / "metrics.jsonl").read_text().splitlines()]
SAME_MACHINE = json.loads((golden_run.GOLDEN / "environment.json").read_text()) == golden_run.environment()


def assert_records_equal(got: list[dict], want: list[dict]) -> None:
    assert [(r["step"], r["kind"]) for r in got] == [(r["step"], r["kind"]) for r in want]
    for a, b in zip(got, want):
        assert a.keys() == b.keys(), (a, b)
        for key in a:
            if key in ("step", "kind"):
                continue
            if SAME_MACHINE:
                assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit for bit
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return golden_run.build_inputs(tmp_path_factory.mktemp("golden"))


@pytest.mark.slow
def test_the_run_reproduces_its_recording(inputs, tmp_path):
    data, teacher = inputs
    run = tmp_path / "run"
    result = train(config_from_dict(golden_run.run_config(run, data, teacher)), log=lambda *a: None)
    assert result.step == golden_run.STEPS
    assert_records_equal(golden_run.losses(run), RECORDED)
    # The final parameters equal the recorded run's last checkpoint.
    ours, theirs = load_model(run).params, load_model(golden_run.GOLDEN / "run").params
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves(theirs)):
        if SAME_MACHINE:
            np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
        else:
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_a_checkpoint_of_the_recording_code_resumes(inputs, tmp_path):
    """The recorded checkpoint at step 8 (params, optimizer state, RNG, data-iterator state, as the
    code of the recording wrote them) restores and the run continues with the recorded losses."""
    data, teacher = inputs
    run = tmp_path / "resumed"
    shutil.copytree(golden_run.GOLDEN / "run", run)
    shutil.rmtree(run / "checkpoints" / str(golden_run.STEPS))
    messages = []
    train(config_from_dict(golden_run.run_config(run, data, teacher)), log=messages.append)
    assert f"resumed {run} from step 8" in messages, messages
    later = [r for r in golden_run.losses(run) if r["step"] > 8]
    assert later and later[0]["step"] == 9
    # A resumed process scores the teacher again at its first evaluation: the same numbers as at 0.
    first_eval = next(r for r in later if r["kind"] == "eval")
    teacher = {k: first_eval.pop(k) for k in list(first_eval) if k.startswith("teacher_")}
    assert_records_equal([{"step": 0, "kind": "eval", **teacher}],
                         [{k: v for k, v in RECORDED[0].items() if not k.startswith("student_")}])
    assert_records_equal(later, [r for r in RECORDED if r["step"] > 8])
