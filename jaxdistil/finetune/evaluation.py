"""Scoring a fine-tuned classifier on a task's validation split(s) with GLUE's metrics.

``predictions`` runs the scoring step over every example (spread over the data shards, the padding
rows dropped, the examples back in order); ``evaluate`` turns them into the task's metrics and score
(``jaxdistil.finetune.metrics``); ``TaskEvaluator`` is the training loop's evaluator
(``jaxdistil.training.hooks.Evaluator``) of a fine-tuning run, of the same kind as the held-out MLM
evaluator of distillation.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxdistil.data.global_batches import ShardedBatches
from jaxdistil.finetune.data import ArrayBatches
from jaxdistil.finetune.metrics import task_metrics, task_score
from jaxdistil.finetune.tasks import Task
from jaxdistil.training import sharding as shd


def predictions(step, params, arrays: dict[str, np.ndarray], rows: int, regression: bool,
                data_shards: int, mesh) -> np.ndarray:
    """The classifier's predictions (class ids, or values) for every example of ``arrays``."""
    n = len(arrays["weight"])
    per_shard = -(-n // data_shards)
    batches = ShardedBatches(
        lambda i, c: ArrayBatches(arrays, rows // data_shards, i, c, train=False,
                                  min_batches=-(-per_shard // (rows // data_shards))),
        data_shards, rows // data_shards, shd.batch_sharding(mesh))
    values, weights = [], []
    for host in batches:
        out = jax.device_get(step.eval_step(params, shd.shard_batch(host, mesh)))
        values.append(out["logits"][:, 0] if regression else out["logits"].argmax(-1))
        weights.append(out["weight"])
    # A global batch is one block of rows per data shard, and shard s holds examples s, s + S, ...:
    # regroup the rows by shard, drop the padding rows (weight 0), put the examples back in order.
    per_batch = rows // data_shards
    by_shard = [np.stack(x).reshape(-1, data_shards, per_batch).transpose(1, 0, 2).reshape(data_shards, -1)
                for x in (values, weights)]
    out = np.empty(n, by_shard[0].dtype)
    for s in range(data_shards):
        out[s::data_shards] = by_shard[0][s][by_shard[1][s] > 0]
    return out


def evaluate(step, params, task: Task, arrays: dict[str, dict], rows: int, data_shards: int, mesh) -> dict:
    """{metrics..., "score"} of the task on its validation split(s)."""
    preds = {name: predictions(step, params, a, rows, task.regression, data_shards, mesh) for name, a in arrays.items()}
    labels = {name: a["label"] for name, a in arrays.items()}
    values = task_metrics(task.metrics, preds, labels)
    return {**values, "score": task_score(values)}


class TaskEvaluator:
    """``evaluator(state) -> {metric: value, ..., "score"}`` on the task's validation split(s)."""

    def __init__(self, step, task: Task, arrays: dict[str, dict], rows: int, data_shards: int):
        self.step, self.task, self.arrays, self.rows, self.data_shards = step, task, arrays, rows, data_shards

    def __call__(self, state: Any) -> dict[str, float]:
        return evaluate(self.step, state.params, self.task, self.arrays, self.rows, self.data_shards, self.step.mesh)

    @staticmethod
    def report(step: int, values: dict[str, float]) -> str:
        return f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items())
