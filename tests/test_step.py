"""The distillation train step on one device: gradients, accumulation, learning, eval.

Flow under test: batch -> masking (once, whole batch) -> teacher -> student -> losses -> grads
(accumulated over micro-batches) -> AdamW update -> metrics. Tiny models (hidden 64, 2 layers,
vocab 128) keep every compile to a few seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.data.masking import MaskingConfig
from jaxdistil.distill import sharding as shd
from jaxdistil.distill import step as stp
from jaxdistil.distill.losses import LossConfig, ce_loss, cos_loss, mlm_loss
from jaxdistil.distill.optim import OptimConfig, make_optimizer
from jaxdistil.errors import UserError
from jaxdistil.models import BertConfig, DistilBertConfig, build_model, init_params

V, D, HEADS, F, LAYERS, P = 128, 64, 8, 128, 2, 32
SPECIAL = 5  # ids 0..4 are "special": never masked, never in the synthetic text
MASK_ID = 3
# Unoptimised LLVM code compiles twice as fast; for jits run only a few times.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def student_cfg(dropout: float = 0.0, sinusoidal: bool = False) -> DistilBertConfig:
    return DistilBertConfig(vocab_size=V, dim=D, n_heads=HEADS, hidden_dim=F, n_layers=LAYERS,
                            max_position_embeddings=P, dropout=dropout, attention_dropout=dropout,
                            sinusoidal_pos_embds=sinusoidal)


def teacher_cfg(dropout: float = 0.0) -> BertConfig:
    return BertConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                      num_hidden_layers=LAYERS, max_position_embeddings=P, hidden_dropout_prob=dropout,
                      attention_probs_dropout_prob=dropout)


def one_device_mesh():
    return shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])


def token_weights(mesh) -> jax.Array:
    w = np.ones((V,), np.float32)
    w[:SPECIAL] = 0.0
    return jax.device_put(w, shd.replicated(mesh))


def random_batch(seed: int, batch: int = 16, length: int = 16) -> dict[str, np.ndarray]:
    """Random ids with right padding of varying length."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(SPECIAL, V, size=(batch, length)).astype(np.int32)
    lens = rs.randint(length // 2, length + 1, size=batch)
    mask = (np.arange(length)[None] < lens[:, None]).astype(np.int32)
    return {"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask}


def packed_batch(seed: int, batch: int = 16, length: int = 16) -> dict[str, np.ndarray]:
    """Two or three sequences packed per row (segment_ids, restarting position_ids), padded."""
    rs = np.random.RandomState(seed)
    ids = rs.randint(SPECIAL, V, size=(batch, length)).astype(np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    for r in range(batch):
        cuts = sorted(rs.choice(np.arange(3, length - 2), size=rs.randint(1, 3), replace=False))
        end = rs.randint(length - 2, length + 1)
        bounds = [0, *cuts, end]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, a:b] = s + 1
            pos[r, a:b] = np.arange(b - a)
    mask = (seg > 0).astype(np.int32)
    return {"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask,
            "segment_ids": seg, "position_ids": pos}


def patterned_batch(seed: int, batch: int = 16, length: int = 16) -> dict[str, np.ndarray]:
    """Learnable text: each row repeats a period-4 pattern drawn from 8 tokens."""
    rs = np.random.RandomState(seed)
    alphabet = np.arange(SPECIAL, SPECIAL + 8)
    pattern = rs.choice(alphabet, size=(batch, 4))
    ids = np.tile(pattern, (1, length // 4)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@functools.lru_cache(maxsize=None)
def initial_params(model_cfg, seed: int):
    """Host copy of a model's random init (cached: every test starting from it skips the init compile)."""
    model = build_model(model_cfg)
    return jax.device_get(jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(seed)))


def make_setup(cfg: stp.StepConfig, s_cfg, t_cfg, mesh, seed: int = 0, compiler_options=None):
    student, teacher = stp.build_models(cfg, s_cfg, t_cfg)
    tx, schedule = make_optimizer(cfg.optim, model_cfg=s_cfg)
    state, state_sh = stp.init_train_state(student, jax.random.PRNGKey(seed), tx, mesh,
                                           params=initial_params(s_cfg, seed))
    teacher_params = teacher_sh = None
    if teacher is not None:
        teacher_params, teacher_sh = stp.shard_teacher(teacher, initial_params(t_cfg, seed + 1), mesh)
    step = stp.make_train_step(student, teacher, cfg, tx, schedule, mesh, shd.RULES, state_sh, teacher_sh,
                               compiler_options=compiler_options)
    return student, teacher, tx, schedule, state, state_sh, teacher_params, teacher_sh, step


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


def test_step_gradients_match_autodiff_and_finite_differences():
    mesh = one_device_mesh()
    # chunk_rows=48 < 8 x 16 rows per micro-batch: the chunked, rematerialised loss path runs.
    cfg = stp.StepConfig(loss=LossConfig(chunk_rows=48),
                         optim=OptimConfig(total_steps=10, grad_accum_steps=2),
                         mask_id=MASK_ID)
    student, teacher, _, _, state, _, t_params, _, _ = make_setup(cfg, student_cfg(), teacher_cfg(), mesh)
    params = state.params
    batch = shd.shard_batch(random_batch(3), mesh)
    key = jax.random.PRNGKey(7)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def step_grads(params):
        inputs, counts = stp.mask_batch(batch, token_weights(mesh), key, cfg, V)
        grads, sums = stp.accumulate_grads(student, teacher, cfg, params, t_params, inputs, counts, key, mesh)
        return grads, inputs

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


def test_accumulation_equals_full_batch_packed_restricted():
    mesh = one_device_mesh()
    # restrict_ce_to_mask: each micro-batch gathers its masked rows (lax.cond fallback included);
    # packed rows: segment_ids / position_ids are split with the ids.
    loss = LossConfig(restrict_ce_to_mask=True, alpha_mse=0.5, chunk_rows=64)
    base = stp.StepConfig(loss=loss, optim=OptimConfig(learning_rate=1e-3, warmup_prop=0.0, total_steps=10),
                          mask_id=MASK_ID)
    accum = dataclasses.replace(base, optim=dataclasses.replace(base.optim, grad_accum_steps=4))
    batch = packed_batch(5)
    results = []
    for cfg in (base, accum):
        *_, state, _, t_params, _, step = make_setup(cfg, student_cfg(), teacher_cfg(), mesh,
                                                     compiler_options=FAST_COMPILE)
        for _ in range(2):
            state, metrics = step(state, t_params, shd.shard_batch(batch, mesh), token_weights(mesh))
        results.append((jax.device_get(state.params), jax.device_get(metrics)))
    (p1, m1), (p4, m4) = results
    assert m1.keys() == m4.keys()
    for k in m1:
        np.testing.assert_allclose(m4[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
    assert m1["loss_ce"] > 0 and m1["loss_mse"] > 0 and m1["loss_cos"] > 0
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        p4, p1)


def test_micro_batches_are_strided_rows():
    x = jnp.arange(12).reshape(12, 1)
    y = stp._split_micro(x, 3, None)
    assert y.shape == (3, 4, 1)
    np.testing.assert_array_equal(y[1, :, 0], [1, 4, 7, 10])


# ------------------------------------------------------------------------------------------------
# Learning curves: MLM-only pre-training of the teacher, then distillation into the student
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained_teacher():
    """MLM-only mode: a tiny BERT trained by the same step on a fixed batch (100 steps)."""
    mesh = one_device_mesh()
    cfg = stp.StepConfig(loss=LossConfig(alpha_ce=0.0, alpha_cos=0.0, alpha_mlm=1.0),
                         optim=OptimConfig(learning_rate=2e-3, warmup_prop=0.05, total_steps=100),
                         masking=MaskingConfig(mlm_mask_prop=0.3), mask_id=MASK_ID)
    model, _, _, _, state, state_sh, _, _, step = make_setup(cfg, teacher_cfg(), None, mesh, seed=11)
    batch = shd.shard_batch(patterned_batch(0), mesh)
    losses = []
    for _ in range(100):
        state, metrics = step(state, None, batch, token_weights(mesh))
        losses.append(float(metrics["loss"]))
    return model, cfg, state, state_sh, losses, metrics


@pytest.mark.slow
def test_mlm_only_learning_curve(pretrained_teacher):
    _, _, state, _, losses, metrics = pretrained_teacher
    assert int(state.step) == 100
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert float(metrics["loss_ce"]) == 0.0 and float(metrics["loss_cos"]) == 0.0
    assert float(metrics["mlm_accuracy"]) > 0.3


@pytest.mark.slow
def test_distillation_learning_curve_and_frozen_positions(pretrained_teacher):
    teacher_model, _, t_state, t_sh, _, _ = pretrained_teacher
    mesh = one_device_mesh()
    cfg = stp.StepConfig(optim=OptimConfig(learning_rate=2e-3, warmup_prop=0.05, total_steps=100),
                         masking=MaskingConfig(mlm_mask_prop=0.3), mask_id=MASK_ID)
    s_cfg = student_cfg(dropout=0.1, sinusoidal=True)  # dropout on: the train-mode path learns too
    student, _ = stp.build_models(cfg, s_cfg, None)
    tx, schedule = make_optimizer(cfg.optim, model_cfg=s_cfg)
    state, state_sh = stp.init_train_state(student, jax.random.PRNGKey(2), tx, mesh,
                                           params=initial_params(s_cfg, 2))
    pos0 = np.asarray(state.params["embeddings"]["position_embeddings"]["embedding"])
    word0 = np.asarray(state.params["embeddings"]["word_embeddings"]["embedding"])
    step = stp.make_train_step(student, teacher_model, cfg, tx, schedule, mesh, shd.RULES, state_sh,
                               t_sh.params)
    batch = shd.shard_batch(patterned_batch(0), mesh)
    losses, lrs = [], []
    for _ in range(100):
        state, metrics = step(state, t_state.params, batch, token_weights(mesh))
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
    assert losses[-1] <= 0.5 * losses[0], (losses[0], losses[-1])
    assert float(metrics["loss_ce"]) > 0 and float(metrics["loss_cos"]) > 0
    assert float(metrics["tokens"]) == 16 * 16 and float(metrics["masked_tokens"]) == math.ceil(0.3 * 256)
    # Schedule: 0 at the first update, peak after the 5 warm-up updates, decaying to ~0.
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(2e-3) and lrs[-1] == pytest.approx(2e-3 / 95, rel=1e-4)
    # Sinusoidal positions are frozen; the rest trains.
    emb = state.params["embeddings"]
    np.testing.assert_array_equal(np.asarray(emb["position_embeddings"]["embedding"]), pos0)
    assert not np.allclose(np.asarray(emb["word_embeddings"]["embedding"]), word0)


def test_eval_step_is_deterministic(pretrained_teacher):
    model, cfg, state, state_sh, _, _ = pretrained_teacher
    mesh = one_device_mesh()
    eval_step = stp.make_eval_step(model, cfg, mesh, shd.RULES, state_sh.params)
    batch = shd.shard_batch(patterned_batch(0), mesh)
    key = jax.device_put(jax.random.PRNGKey(123), shd.replicated(mesh))
    a = jax.device_get(eval_step(state.params, batch, token_weights(mesh), key))
    b = jax.device_get(eval_step(state.params, batch, token_weights(mesh), key))
    assert a == b
    assert a["mlm_rows"] == math.ceil(0.3 * 256) and a["tokens"] == 256
    assert a["mlm_correct"] / a["mlm_rows"] > 0.3  # the trained model, scored without dropout
    assert a["mlm_sum"] / a["mlm_rows"] < 0.5 * math.log(V)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_user_errors():
    mesh = one_device_mesh()
    cfg = stp.StepConfig(optim=OptimConfig(total_steps=10), mask_id=MASK_ID)
    student, _ = stp.build_models(cfg, student_cfg(), None)
    tx, schedule = make_optimizer(cfg.optim)
    with pytest.raises(UserError, match="alpha_ce"):
        stp.make_train_step(student, None, cfg, tx, schedule, mesh, shd.RULES, None)
    wide = dataclasses.replace(teacher_cfg(), hidden_size=2 * D)
    _, teacher = stp.build_models(cfg, student_cfg(), wide)
    with pytest.raises(UserError, match="hidden"):
        stp.make_train_step(student, teacher, cfg, tx, schedule, mesh, shd.RULES, None)
    with pytest.raises(UserError, match="dtype"):
        stp.StepConfig(dtype="float8")
    mesh8 = shd.make_mesh(shd.MeshConfig(data=8))
    with pytest.raises(UserError, match="multiple of 16"):
        shd.check_batch(8, mesh8, micro_batches=2)
