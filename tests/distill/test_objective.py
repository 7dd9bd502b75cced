"""The distillation objective on the step template, one device: gradients, accumulation, learning, eval.

Flow under test: batch -> masking (once, whole batch) -> teacher -> student -> losses -> grads
(accumulated over micro-batches) -> AdamW update -> metrics. Every step comes from the builder
(``tiny.build``, the ``tiny_step`` fixture).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from tiny import (
    FAST_COMPILE,
    MASK_ID,
    V,
    packed_batch,
    patterned_batch,
    random_batch,
    student_cfg,
    teacher_cfg,
)

from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill import objective as stp
from jaxdistil.distill.losses import LossConfig, ce_loss, cos_loss, mlm_loss
from jaxdistil.errors import UserError
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig
from jaxdistil.training.state import trainable
from jaxdistil.training.step import accumulate_grads

# ------------------------------------------------------------------------------------------------
# Gradients: the step's gradient path == autodiff of the plain loss == finite differences
# ------------------------------------------------------------------------------------------------


def plain_total(student, teacher, loss_cfg, params, teacher_params, inputs):
    """The loss written from the spec: full forward (logits [B, T, V]), plain loss functions."""
    kwargs = {k: inputs[k] for k in stp.MODEL_INPUTS if k in inputs}
    s_out = student.apply({"params": params}, inputs["input_ids"], **kwargs)
    t_out = teacher.apply({"params": teacher_params}, inputs["input_ids"], **kwargs)
    am = inputs["attention_mask"]
    rows = (inputs["labels"] != -100) if loss_cfg.restrict_ce_to_mask else am
    return (loss_cfg.alpha_ce * ce_loss(s_out.logits, t_out.logits, rows, loss_cfg.temperature)
            + loss_cfg.alpha_mlm * mlm_loss(s_out.logits, inputs["labels"])
            + loss_cfg.alpha_cos * cos_loss(s_out.hidden_states[-1], t_out.hidden_states[-1], am))


@pytest.mark.slow
def test_step_gradients_match_autodiff_and_finite_differences(tiny_step):
    # chunk_rows=48 < 8 x 16 rows per micro-batch: the chunked, rematerialised loss path runs.
    cfg = stp.StepConfig(loss=LossConfig(chunk_rows=48),
                         optim=OptimConfig(total_steps=10, grad_accum_steps=2),
                         mask_id=MASK_ID)
    t = tiny_step(cfg)
    mesh, objective = t.mesh, t.built.objective
    student, teacher, params, t_params = t.built.student, t.built.teacher, t.state.params, t.teacher_params
    batch = t.built.shard_batch(random_batch(3))
    key = jax.random.PRNGKey(7)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step_grads(params):
        inputs, counts = objective.prepare(batch, t.consts, key)
        grads, sums = accumulate_grads(objective, trainable(params, {}), inputs, counts, t.consts, key, 2, mesh)
        return grads["model"], inputs

    grads, inputs = step_grads(params)
    assert int((inputs["labels"] != -100).sum()) == math.ceil(0.15 * int(batch["attention_mask"].sum()))

    loss = jax.jit(lambda p: plain_total(student, teacher, cfg.loss, p, t_params, inputs),
                   compiler_options=FAST_COMPILE)
    ref = jax.jit(jax.grad(lambda p: plain_total(student, teacher, cfg.loss, p, t_params, inputs)),
                  compiler_options=FAST_COMPILE)(params)
    flat_g = jax.tree_util.tree_leaves_with_path(grads)
    flat_r = jax.tree_util.tree_leaves(ref)
    for (path, g), r in zip(flat_g, flat_r):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6, rtol=1e-4,
                                   err_msg=jax.tree_util.keystr(path))

    # Finite differences (fp32, central, along directions where the derivative is large).
    def along(direction, h):
        return float(loss(jax.tree_util.tree_map(lambda p, d: p + h * d, params, direction)))

    rs = np.random.RandomState(0)
    names = ["embeddings/word_embeddings/embedding", "encoder/layers/q_lin/kernel",
             "encoder/layers/lin2/bias",
             "encoder/layers/sa_layer_norm/scale", "mlm_head/transform/kernel", "mlm_head/bias"]
    checked = 0
    for (path, g) in flat_g:
        name = "/".join(str(k.key) for k in path)
        if name not in names:
            continue
        g = np.asarray(g)
        # Gradient direction (derivative = |g|), bent by a random component so a wrong direction shows.
        d = g / np.linalg.norm(g) + 0.5 * rs.normal(size=g.shape) / np.sqrt(g.size)
        direction = jax.tree_util.tree_map(jnp.zeros_like, params)
        direction = jax.tree_util.tree_map_with_path(
            lambda p, x: jnp.asarray(d, x.dtype) if p == path else x, direction)
        h = 1e-2
        fd = (along(direction, h) - along(direction, -h)) / (2 * h)
        analytic = float(np.sum(g * d))
        assert abs(fd - analytic) <= 2e-2 * abs(analytic) + 1e-3, (name, fd, analytic)
        checked += 1
    assert checked == len(names)


# ------------------------------------------------------------------------------------------------
# Gradient accumulation: k micro-batches of b == one batch of k*b
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accumulation_equals_full_batch_packed_restricted(tiny_step):
    # restrict_ce_to_mask: each micro-batch gathers its masked rows (lax.cond fallback included);
    # packed rows: segment_ids / position_ids are split with the ids.
    loss = LossConfig(restrict_ce_to_mask=True, alpha_mse=0.5, chunk_rows=64)
    base = stp.StepConfig(loss=loss, optim=OptimConfig(learning_rate=1e-3, warmup_prop=0.0, total_steps=10),
                          mask_id=MASK_ID)
    accum = dataclasses.replace(base, optim=dataclasses.replace(base.optim, grad_accum_steps=4))
    batch = packed_batch(5)
    results = []
    for cfg in (base, accum):
        t = tiny_step(cfg, compiler_options=FAST_COMPILE)
        for _ in range(2):
            metrics = t.step(batch)
        results.append((jax.device_get(t.state.params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    assert m1.keys() == m4.keys()
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path)),
        m4, m1)
    assert m1["loss_ce"] > 0 and m1["loss_mse"] > 0 and m1["loss_cos"] > 0
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        p4, p1)


# ------------------------------------------------------------------------------------------------
# Learning curves: MLM-only pre-training of the teacher, then distillation into the student
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_teacher():
    """MLM-only mode: a tiny BERT trained by the same step on a fixed batch (100 steps)."""
    cfg = stp.StepConfig(loss=LossConfig(alpha_ce=0.0, alpha_cos=0.0, alpha_mlm=1.0),
                         optim=OptimConfig(learning_rate=2e-3, warmup_prop=0.05, total_steps=100),
                         masking=MaskingConfig(mlm_mask_prop=0.3), mask_id=MASK_ID)
    t = tiny.build(cfg, teacher_cfg(), None, seed=11)
    losses = []
    for _ in range(100):
        metrics = t.step(patterned_batch(0))
        losses.append(float(metrics["loss"]))
    return t, losses, metrics


@pytest.mark.slow
def test_mlm_only_learning_curve(pretrained_teacher):
    t, losses, metrics = pretrained_teacher
    assert int(t.state.step) == 100
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert "loss_ce" not in metrics and float(metrics["loss_cos"]) == 0.0  # no teacher: no KL computed
    assert float(metrics["mlm_accuracy"]) > 0.3


@pytest.mark.slow
def test_distillation_learning_curve_and_frozen_positions(pretrained_teacher, tiny_step):
    teacher, _, _ = pretrained_teacher
    cfg = stp.StepConfig(optim=OptimConfig(learning_rate=2e-3, warmup_prop=0.05, total_steps=100),
                         masking=MaskingConfig(mlm_mask_prop=0.3), mask_id=MASK_ID)
    s_cfg = student_cfg(dropout=0.1, sinusoidal=True)  # dropout on: the train-mode path learns too
    t = tiny_step(cfg, s_cfg, teacher_cfg(), seed=2, teacher_params=jax.device_get(teacher.state.params))
    pos0 = np.asarray(t.state.params["embeddings"]["position_embeddings"]["embedding"])
    word0 = np.asarray(t.state.params["embeddings"]["word_embeddings"]["embedding"])
    losses, lrs = [], []
    for _ in range(100):
        metrics = t.step(patterned_batch(0))
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
    state = t.state
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert float(metrics["loss_ce"]) > 0 and float(metrics["loss_cos"]) > 0
    assert float(metrics["counts"]["tokens"]) == 16 * 16
    assert float(metrics["counts"]["masked"]) == math.ceil(0.3 * 256)
    # Schedule: 0 at the first update, peak after the 5 warm-up updates, decaying to ~0.
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-3 / 95, rel=1e-4)
    # Sinusoidal positions are frozen; the rest trains.
    emb = state.params["embeddings"]
    np.testing.assert_array_equal(np.asarray(emb["position_embeddings"]["embedding"]), pos0)
    assert not np.allclose(np.asarray(emb["word_embeddings"]["embedding"]), word0)


@pytest.mark.slow
def test_eval_step_is_deterministic(pretrained_teacher):
    t, _, _ = pretrained_teacher
    eval_step = t.built.eval_step("student")
    batch = t.built.shard_batch(patterned_batch(0))
    key = t.built.replicate(jax.random.PRNGKey(123))
    weights = t.consts["token_weights"]
    a = jax.device_get(eval_step(t.state.params, batch, weights, key))
    b = jax.device_get(eval_step(t.state.params, batch, weights, key))
    assert a == b
    assert a["mlm_rows"] == math.ceil(0.3 * 256) and a["tokens"] == 256
    assert a["mlm_correct"] / a["mlm_rows"] > 0.3  # the trained model, scored without dropout
    assert a["mlm_sum"] / a["mlm_rows"] < 0.5 * math.log(V)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_user_errors():
    cfg = stp.StepConfig(optim=OptimConfig(total_steps=10), mask_id=MASK_ID)
    student, _ = stp.build_models(cfg, student_cfg(), None)
    with pytest.raises(UserError, match="alpha_ce"):
        stp.DistillObjective(student, None, cfg)
    wide = dataclasses.replace(teacher_cfg(), hidden_size=2 * tiny.D)
    _, teacher = stp.build_models(cfg, student_cfg(), wide)
    with pytest.raises(UserError, match="hidden"):
        stp.DistillObjective(student, teacher, cfg)
    with pytest.raises(UserError, match="dtype"):
        stp.StepConfig(dtype="float8")
    mesh8 = shd.make_mesh(shd.MeshConfig(data=8))
    with pytest.raises(UserError, match="multiple of 16"):
        shd.check_batch(8, mesh8, micro_batches=2)
