"""GLUE's metrics (scikit-learn / scipy), a task's score and the macro-score, defined once here.

  accuracy   sklearn.metrics.accuracy_score          SST-2, QNLI, RTE, WNLI, MNLI (matched, mismatched)
  f1         sklearn.metrics.f1_score (positive = 1) MRPC, QQP (with accuracy)
  mcc        sklearn.metrics.matthews_corrcoef       CoLA
  pearson    scipy.stats.pearsonr                    STS-B (with spearman)
  spearman   scipy.stats.spearmanr

A task's score is the mean of its metrics, in percent (MRPC: (F1 + accuracy) / 2; STS-B:
(Pearson + Spearman) / 2; MNLI: (matched + mismatched accuracy) / 2), as the GLUE leaderboard
averages them; the **macro-score** is the mean of the task scores, the number the DistilBERT paper
reports (77.0 for DistilBERT vs 79.5 for BERT-base on the 9 dev sets).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats
from sklearn import metrics as skm


def metric(name: str, predictions: np.ndarray, labels: np.ndarray) -> float:
    """One metric of predictions (class ids, or values for regression) against labels."""
    if name.startswith("accuracy"):
        return float(skm.accuracy_score(labels, predictions))
    if name == "f1":
        return float(skm.f1_score(labels, predictions, pos_label=1, average="binary", zero_division=0.0))
    if name == "mcc":
        return float(skm.matthews_corrcoef(labels, predictions))
    if name == "pearson":
        return float(stats.pearsonr(predictions, labels)[0])
    if name == "spearman":
        return float(stats.spearmanr(predictions, labels)[0])
    raise ValueError(f"unknown metric {name!r}")


def task_metrics(names: tuple[str, ...], predictions: Mapping[str, np.ndarray],
                 labels: Mapping[str, np.ndarray]) -> dict[str, float]:
    """The task's metrics from each validation split's predictions. A task with two validation
    splits (MNLI) names its metrics ``accuracy_matched`` / ``accuracy_mismatched``: each is computed on
    the split of that suffix."""
    out = {}
    splits = list(predictions)
    for name in names:
        suffix = "_" + name.split("_", 1)[1] if name.startswith("accuracy_") else None
        split = next((s for s in splits if suffix and s.endswith(suffix)), splits[0])
        out[name] = metric(name, predictions[split], labels[split])
    return out


def task_score(values: Mapping[str, float]) -> float:
    """A task's score: the mean of its metrics, in percent."""
    return 100.0 * float(np.mean(list(values.values())))


def macro_score(scores: Mapping[str, float]) -> float:
    """The GLUE macro-score: the mean of the task scores (each already in percent)."""
    return float(np.mean(list(scores.values())))
