"""GLUE's metrics against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from jaxdistil.finetune import metrics as ft_metrics

torch = pytest.importorskip("torch")


def test_metrics_equal_their_definitions():
    rng = np.random.default_rng(3)
    y, p = rng.integers(0, 2, 500), rng.integers(0, 2, 500)
    tp, fp, fn, tn = (np.sum((p == 1) & (y == 1)), np.sum((p == 1) & (y == 0)), np.sum((p == 0) & (y == 1)),
                      np.sum((p == 0) & (y == 0)))
    assert ft_metrics.metric("accuracy", p, y) == pytest.approx(np.mean(p == y))
    assert ft_metrics.metric("f1", p, y) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    assert ft_metrics.metric("mcc", p, y) == pytest.approx(mcc)
    a, b = rng.normal(size=300), rng.normal(size=300)
    b = a + rng.normal(size=300)
    assert ft_metrics.metric("pearson", a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731  (no ties in continuous data)
    assert ft_metrics.metric("spearman", a, b) == pytest.approx(np.corrcoef(ranks(a), ranks(b))[0, 1])
    # MNLI: each accuracy on its own split; the task score is the mean of its metrics, in percent.
    preds = {"validation_matched": np.array([0, 1, 2, 2]), "validation_mismatched": np.array([0, 0, 0, 0])}
    labels = {"validation_matched": np.array([0, 1, 2, 0]), "validation_mismatched": np.array([0, 1, 1, 1])}
    got = ft_metrics.task_metrics(("accuracy_matched", "accuracy_mismatched"), preds, labels)
    assert got == {"accuracy_matched": 0.75, "accuracy_mismatched": 0.25}
    assert ft_metrics.task_score(got) == pytest.approx(50.0)
    assert ft_metrics.macro_score({"CoLA": 50.0, "SST-2": 90.0, "MRPC": 85.0}) == pytest.approx(75.0)
