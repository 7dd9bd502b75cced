"""What a run logs: an interval's losses divided once (summed numerators over summed denominators,
as one large batch would give, never a mean of per-step means), totals summed, norms averaged, the
metrics file truncated on resume, throughput without the compiling step."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from jaxdistil.training.metrics import MetricsWriter, TrainLog, read_metrics


def combine(sums, counts):
    """A two-term objective: mean a over rows, mean b over tokens, total = a + 2 b."""
    a = sums["a"] / np.maximum(counts["rows"], 1.0)
    b = sums["b"] / np.maximum(counts["tokens"], 1.0)
    return a + 2 * b, {"loss": a + 2 * b, "loss_a": a, "loss_b": b}


def step_metrics(a, b, rows, tokens, grad, lr):
    _, means = combine({"a": np.float32(a), "b": np.float32(b)},
                       {"rows": np.float32(rows), "tokens": np.float32(tokens)})
    return {**means, "grad_norm": np.float32(grad), "update_norm": np.float32(grad / 10), "lr": np.float32(lr),
            "param_norm": np.float32(lr * 100), "sums": {"a": np.float32(a), "b": np.float32(b)},
            "counts": {"rows": np.float32(rows), "tokens": np.float32(tokens)}}


def make_log(tmp_path, **kw):
    writer = MetricsWriter(tmp_path, tensorboard=False, resume_step=None, enabled=True)
    return TrainLog(writer, 10, 0, lambda t: 1.0, 1.0, progress=False, combine=combine,
                    totals={"tokens": "tokens", "examples": "rows"}, **kw)


def test_interval_divides_summed_sums_by_summed_counts(tmp_path):
    log = make_log(tmp_path)
    steps = [step_metrics(10.0, 4.0, 5, 40, 1.0, 0.1), step_metrics(1.0, 30.0, 1, 60, 3.0, 0.2)]
    out = log.interval_values(steps)
    # (10 + 1) / (5 + 1) and (4 + 30) / (40 + 60): the mean over the interval's rows, not of the means.
    assert out["loss_a"] == pytest.approx(11 / 6) and out["loss_b"] == pytest.approx(34 / 100)
    assert out["loss"] == pytest.approx(11 / 6 + 2 * 0.34)
    mean_of_means = np.mean([10 / 5, 1 / 1])
    assert out["loss_a"] != pytest.approx(mean_of_means)
    assert out["tokens"] == 100 and out["examples"] == 6
    assert out["grad_norm"] == pytest.approx(2.0) and out["update_norm"] == pytest.approx(0.2)
    assert out["lr"] == pytest.approx(0.2) and out["param_norm"] == pytest.approx(20.0)  # the last step's


def test_one_step_interval_is_the_step_itself(tmp_path):
    log = make_log(tmp_path)
    m = step_metrics(3.0, 7.0, 3, 9, 0.5, 0.01)
    out = log.interval_values([m])
    for key in ("loss", "loss_a", "loss_b", "grad_norm", "lr", "param_norm", "update_norm"):
        assert out[key] == float(m[key])  # bit for bit: the step's own values
    assert out["tokens"] == 9


def test_flush_writes_lines_and_throughput_skips_the_compiling_step(tmp_path):
    log = make_log(tmp_path)
    batch = {"input_ids": np.zeros((2, 4), np.int32), "attention_mask": np.ones((2, 4), np.int32)}
    for i in range(3):
        log.add(jax.device_put(step_metrics(1.0, 1.0, 1, 8, 1.0, 0.1)), batch)
    log.flush(3)
    log.close()
    (line,) = read_metrics(tmp_path)["train"]
    assert line["step"] == 3 and line["tokens"] == 24
    assert "tokens_per_s" in line and "mfu" in line  # the first step of the shape is left out of the clock
    assert log.tokens == 0  # the clock restarts after a flush


def test_writer_truncates_on_resume_and_starts_fresh(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True, resume_step=None, enabled=True)
    for step in (1, 2, 3, 4):
        w.write(step, "train", {"loss": float(step)})
    w.close()
    assert (tmp_path / "tb").is_dir()
    w = MetricsWriter(tmp_path, tensorboard=False, resume_step=2, enabled=True)  # resumed from step 2
    w.write(3, "train", {"loss": 30.0})
    w.close()
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    MetricsWriter(tmp_path, tensorboard=False, resume_step=None, enabled=True).close()  # a fresh run
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    MetricsWriter(tmp_path / "other", tensorboard=False, resume_step=None, enabled=False).write(1, "train", {})
    assert not (tmp_path / "other").exists()  # processes other than 0 write nothing
