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


@pytest.mark.slow
def test_logged_grad_norm_is_the_norm_of_the_trainable_gradients(tmp_path):
    """A DistilBERT with sinusoidal positions freezes them in fine-tuning (transformers:
    requires_grad=False): the step leaves the position table as it was, and its grad_norm (what the
    Log hook writes) is the norm of the other parameters' gradients, here from torch autograd of
    transformers' own loss on the same batch."""
    import dataclasses

    import jax
    from classifiers import hf_model, ragged
    from transformers import AutoModelForSequenceClassification

    from jaxdistil.finetune.config import RUN_GLUE_OPTIM
    from jaxdistil.finetune.step import build_classifier_step
    from jaxdistil.hf import load_model
    from jaxdistil.training.sharding import MeshConfig

    model = hf_model(tmp_path / "m", "DistilBertForSequenceClassification", num_labels=2, sinusoidal_pos_embds=True,
                     dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    loaded = load_model(model)
    ids, mask, _ = ragged(0, False)
    ids, mask = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])  # 8 rows: one per device
    labels = np.array([0, 1, 1, 0, 1, 1, 0, 0], np.int32)
    step = build_classifier_step(loaded.config, loaded.head, dataclasses.replace(RUN_GLUE_OPTIM, total_steps=1),
                                 MeshConfig())
    assert step.core.frozen == ("model/embeddings/position_embeddings/embedding",)
    state = step.init_state(jax.random.PRNGKey(0), loaded.classifier_params())
    with jax.default_matmul_precision("highest"):
        state, metrics = step.train_step(state, step.shard_batch(
            {"input_ids": ids, "attention_mask": mask, "label": labels, "weight": np.ones(8, np.float32)}))

    torch_model = AutoModelForSequenceClassification.from_pretrained(str(model)).train()
    for p in torch_model.parameters():
        p.requires_grad_(True)
    out = torch_model(input_ids=torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
                      labels=torch.as_tensor(labels, dtype=torch.long))
    out.loss.backward()
    positions = "distilbert.embeddings.position_embeddings.weight"
    grads = {n: p.grad.double() for n, p in torch_model.named_parameters()}
    trainable = float(torch.sqrt(sum((g**2).sum() for n, g in grads.items() if n != positions)))
    everything = float(torch.sqrt(sum((g**2).sum() for g in grads.values())))
    assert float(metrics["loss"]) == pytest.approx(out.loss.item(), rel=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(trainable, rel=1e-4)
    assert everything - trainable > 1e-3 * trainable  # the frozen table's gradient is not negligible
    after = np.asarray(jax.device_get(state.params["embeddings"]["position_embeddings"]["embedding"]))
    np.testing.assert_array_equal(after, loaded.params["embeddings"]["position_embeddings"]["embedding"])
