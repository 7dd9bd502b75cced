"""Scoring a classifier: predictions of every example come back in order from the data shards
(padding rows dropped), and the task's metrics are computed on them."""

from __future__ import annotations

import jax
import numpy as np

from jaxdistil.finetune.evaluation import TaskEvaluator, predictions
from jaxdistil.finetune.tasks import Examples, Task
from jaxdistil.training import sharding as shd


class FakeStep:
    """A "classifier" that predicts the first input id modulo 3: its logits are one-hot."""

    def __init__(self, mesh):
        self.mesh = mesh

    def eval_step(self, params, batch):
        ids = batch["input_ids"][:, 0]
        return {"logits": jax.nn.one_hot(ids % 3, 3), "weight": batch["weight"]}


def test_predictions_return_in_order_from_every_shard():
    mesh = shd.make_mesh(shd.MeshConfig(data=4), jax.devices()[:4])
    n = 13
    arrays = {"input_ids": np.arange(n, dtype=np.int32)[:, None] * np.ones((1, 4), np.int32),
              "attention_mask": np.ones((n, 4), np.int32), "label": np.arange(n) % 3,
              "weight": np.ones(n, np.float32)}
    got = predictions(FakeStep(mesh), None, arrays, rows=8, regression=False, data_shards=4, mesh=mesh)
    np.testing.assert_array_equal(got, np.arange(n) % 3)
    examples = Examples([("x",)] * n, arrays["label"])
    task = Task("toy", num_labels=3, problem_type="single_label_classification", label_names=("a", "b", "c"),
                metrics=("accuracy",), train=examples, validation={"validation": examples})

    class State:
        params = None

    evaluator = TaskEvaluator(FakeStep(mesh), task, {"validation": arrays}, 8, 4)
    values = evaluator(State())
    assert values["accuracy"] == 1.0 and values["score"] == 100.0
    assert TaskEvaluator.report(3, values).startswith("step 3: accuracy 1.0000")
