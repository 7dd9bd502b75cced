"""The classifier's objective against PyTorch: cross-entropy or MSE over the real rows (padding rows
weigh 0), accuracy, and the whole batch's count as the denominator."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.finetune.step import ClassifierObjective, example_losses

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("regression", [False, True])
def test_objective_equals_torch(regression):
    rs = np.random.RandomState(0)
    logits = rs.normal(size=(6, 1 if regression else 3)).astype(np.float32)
    labels = (rs.normal(size=6).astype(np.float32) if regression else rs.randint(0, 3, 6).astype(np.int32))
    weight = np.array([1, 1, 1, 1, 0, 0], np.float32)
    obj = ClassifierObjective(model=None, regression=regression)
    obj.forward = lambda params, batch, deterministic, key=None: jnp.asarray(logits)
    batch = {"input_ids": np.zeros((6, 4), np.int32), "attention_mask": np.ones((6, 4), np.int32),
             "label": labels, "weight": weight}
    inputs, counts = obj.prepare(batch, {}, None)
    assert float(counts["rows"]) == 4 and float(counts["tokens"]) == 16
    loss, metrics = obj.combine(obj.sums({"model": None}, inputs, {}, None), counts)
    t_logits, real = torch.tensor(logits[:4]), slice(0, 4)
    if regression:
        want = torch.nn.functional.mse_loss(t_logits[:, 0], torch.tensor(labels[real]))
    else:
        want = torch.nn.functional.cross_entropy(t_logits, torch.tensor(labels[real], dtype=torch.long))
        assert float(metrics["accuracy"]) == pytest.approx(float((logits[:4].argmax(-1) == labels[:4]).mean()))
    assert float(loss) == pytest.approx(float(want), rel=1e-6)
    per_example = example_losses(jnp.asarray(logits), jnp.asarray(labels), regression)
    assert per_example.shape == (6,)
