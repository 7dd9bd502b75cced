"""The reference's other recipes in the distillation objective: GPT-2's L_clm (against
``torch.nn.functional.cross_entropy`` on shifted logits), a GPT-2 student distilled from a GPT-2
teacher, students of another width (L_cos through a learned projection), the recipe configs, and
RoBERTa / GPT-2 steps under data / fsdp / tensor meshes equal to one device."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tiny
from families import fixed_batch, tiny_gpt2

from jaxdistil.data.masking import IGNORE_INDEX, causal_labels
from jaxdistil.distill import objective as stp
from jaxdistil.distill.builder import DistillStep, StepSpec
from jaxdistil.distill.losses import LossConfig, combine_losses, loss_counts, loss_sums, plain_loss_sums
from jaxdistil.errors import UserError
from jaxdistil.models import (
    BertConfig,
    DistilBertConfig,
    GPT2Config,
    RobertaConfig,
    build_model,
    init_params,
)
from jaxdistil.students import student_from_teacher
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.slow
def test_clm_loss_equals_torch_cross_entropy_on_shifted_logits():
    F = torch.nn.functional
    rng = np.random.default_rng(0)
    b, t, d, v = 3, 9, 8, 23
    ids = rng.integers(0, v, size=(b, t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.array([9, 6, 2])[:, None]).astype(np.int32)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    w = rng.normal(size=(d, v)).astype(np.float32)
    labels = np.asarray(causal_labels(ids, mask))
    # The reference: lm_labels = ids with -100 at padding, CE(logits[:, :-1], lm_labels[:, 1:]).
    lm_labels = np.where(mask == 1, ids, -100).astype(np.int64)
    logits = torch.from_numpy(hidden @ w)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, v), torch.from_numpy(lm_labels[:, 1:]).reshape(-1),
                          ignore_index=-100)
    assert (labels[:, -1] == IGNORE_INDEX).all() and (labels != IGNORE_INDEX).sum() == 8 + 5 + 1
    cfg = LossConfig(alpha_ce=0.0, alpha_cos=0.0, alpha_mlm=0.0, alpha_clm=1.0, chunk_rows=4)
    counts = loss_counts(jnp.asarray(labels), jnp.asarray(mask), cfg)
    for fn, extra in ((loss_sums, {}), (plain_loss_sums, {})):
        sums = fn(jnp.asarray(hidden), None, lambda h: h @ jnp.asarray(w), None, jnp.asarray(labels),
                  jnp.asarray(mask), cfg, **extra)
        total, metrics = combine_losses(sums, counts, cfg)
        np.testing.assert_allclose(float(metrics["loss_clm"]), float(ref), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(float(total), float(ref), rtol=1e-5, atol=1e-6)
        assert float(metrics["loss_mlm"]) == 0.0
    # Packed rows: no label across a segment boundary.
    seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0]] * b)
    packed = np.asarray(causal_labels(ids, np.ones_like(ids), seg))
    assert packed[0, 2] == IGNORE_INDEX and packed[0, 3] == ids[0, 4] and (packed[0, 6:] == IGNORE_INDEX).all()


@pytest.mark.slow
def test_gpt2_student_distils_from_a_gpt2_teacher():
    """A 2-layer GPT-2 student (teacher layers 0 and 2) distilled from a random 4-layer GPT-2 on a
    fixed batch: the triple loss (KL + L_clm + L_cos) falls by half within 100 updates."""
    t_cfg = dataclasses.replace(tiny_gpt2(), initializer_range=0.3)  # a peaked, far from uniform teacher
    teacher = build_model(t_cfg)
    t_params = jax.device_get(jax.jit(lambda r: init_params(teacher, r))(jax.random.PRNGKey(1)))
    s_cfg, s_params, _ = student_from_teacher(t_cfg, t_params, layers=(0, 2))
    assert type(s_cfg) is GPT2Config and s_cfg.n_layer == 2
    assert "final_layer_norm" in s_params["encoder"] and "mlm_head" not in s_params
    cfg = stp.StepConfig(loss=LossConfig(alpha_ce=5.0, alpha_mlm=0.0, alpha_clm=2.0, alpha_cos=1.0),
                         optim=OptimConfig(learning_rate=3e-3, warmup_prop=0.0, total_steps=100), causal=True)
    t = tiny.build(cfg, s_cfg, t_cfg, student_params=s_params, teacher_params=t_params)
    t.consts = t.built.consts(t.teacher_params, np.ones(128, np.float32))
    losses = [jax.device_get(t.step(fixed_batch(128, 127))) for _ in range(100)]
    first, last = losses[0], losses[-1]
    assert "loss_clm" in first and float(first["loss_mlm"]) == 0.0
    assert float(first["counts"]["masked"]) == float(np.sum(np.asarray(fixed_batch(128, 127)["attention_mask"])[:, 1:]
                                                         * np.asarray(fixed_batch(128, 127)["attention_mask"])[:, :-1]))
    assert last["loss"] <= 0.5 * first["loss"], (first["loss"], last["loss"])
    assert last["loss_ce"] < 0.5 * first["loss_ce"] and last["loss_cos"] < first["loss_cos"]


@pytest.mark.slow
def test_narrow_student_distils_through_a_projection():
    t_cfg = BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
                       intermediate_size=256, max_position_embeddings=32)
    s_cfg = DistilBertConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=32,
                             dropout=0.0, attention_dropout=0.0)
    base = dict(optim=OptimConfig(learning_rate=2e-3, warmup_prop=0.0, total_steps=60), mask_id=3)
    # Without a projection: one line naming both widths and the fix.
    with pytest.raises(UserError) as err:
        DistillStep(StepSpec(s_cfg, t_cfg, stp.StepConfig(**base), shd.MeshConfig(data=1)), devices=jax.devices()[:1])
    msg = str(err.value)
    assert "128" in msg and "64" in msg and "cos_projection=linear" in msg and "\n" not in msg

    loss = LossConfig(cos_projection="linear")
    t = tiny.build(stp.StepConfig(loss=loss, projection=(64, 128), **base), s_cfg, t_cfg, student_params=None)
    # The projection is the objective's own module (TrainState.extra), beside the model's params.
    assert set(t.state.extra) == {stp.COS_PROJECTION} and stp.COS_PROJECTION not in t.state.params
    proj = t.state.extra[stp.COS_PROJECTION]
    assert proj["kernel"].shape == (64, 128) and proj["bias"].shape == (128,)
    start = jax.device_get(proj["kernel"])
    batch = fixed_batch(128, 0)
    history = [jax.device_get(t.step(batch)) for _ in range(60)]
    assert history[-1]["loss_cos"] < 0.7 * history[0]["loss_cos"]
    assert history[-1]["loss"] < history[0]["loss"]
    assert not np.allclose(jax.device_get(t.state.extra[stp.COS_PROJECTION]["kernel"]), start)  # it is trained
    # The held-out scoring runs the model alone (the projection is not part of it).
    sums = t.built.eval_step("student")(t.state.params, t.built.shard_batch(batch), t.consts["token_weights"],
                                        jax.random.PRNGKey(0))
    assert float(sums["mlm_rows"]) > 0


def test_recipe_configs_and_lm_kind_errors():
    from jaxdistil.distill.config import load_run_config

    roberta = load_run_config("distilroberta-base")  # shipped configs, by name
    assert roberta.teacher.model == "roberta-base" and tuple(roberta.student.layers) == (0, 2, 4, 7, 9, 11)
    assert [(t.kind, t.weight, t.temperature) for t in roberta.terms] == [("kl", 5, 2), ("mlm_ce", 2, None),
                                                                          ("hidden_cos", 1, None)]
    gpt2 = load_run_config("configs/distilgpt2.yaml")
    assert gpt2.teacher.model == "gpt2" and gpt2.student.freeze_pos_embs
    assert [(t.kind, t.weight) for t in gpt2.terms] == [("kl", 5), ("clm_ce", 2), ("hidden_cos", 1)]
    for cfg in (roberta, gpt2):  # the shorthand off: nothing counts twice
        assert (cfg.loss.alpha_ce, cfg.loss.alpha_mlm, cfg.loss.alpha_clm, cfg.loss.alpha_cos) == (0, 0, 0, 0)
    # The step refuses the other family's LM loss, in one line each.
    for kwargs, words in ((dict(causal=True), "alpha_clm"), (dict(loss=LossConfig(alpha_mlm=0.0, alpha_clm=1.0)),
                                                              "alpha_mlm")):
        with pytest.raises(UserError) as err:
            stp.StepConfig(**kwargs)
        assert words in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError):
        LossConfig(alpha_mlm=1.0, alpha_clm=1.0)
    # Masked teacher, causal student: refused.
    with pytest.raises(UserError) as err:
        DistillStep(StepSpec(tiny_gpt2(), BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                     num_attention_heads=8, intermediate_size=128),
                             stp.StepConfig(causal=True, loss=LossConfig(alpha_mlm=0.0, alpha_clm=1.0),
                                            optim=OptimConfig(total_steps=1))),
                    devices=jax.devices()[:1])
    assert "causal" in str(err.value) and "masked" in str(err.value)


V, D, HEADS, F, LAYERS, POS = 128, 64, 8, 128, 2, 32


FAMILIES = {
    "roberta": (RobertaConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                              num_hidden_layers=LAYERS, max_position_embeddings=POS + 2),
                RobertaConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                              num_hidden_layers=LAYERS + 1, max_position_embeddings=POS + 2),
                dict(mask_id=4), 1),
    "gpt2": (GPT2Config(vocab_size=V, n_embd=D, n_head=HEADS, n_inner=F, n_layer=LAYERS, n_positions=POS,
                        bos_token_id=V - 1, eos_token_id=V - 1),
             GPT2Config(vocab_size=V, n_embd=D, n_head=HEADS, n_inner=F, n_layer=LAYERS + 1, n_positions=POS,
                        bos_token_id=V - 1, eos_token_id=V - 1),
             dict(causal=True, loss=LossConfig(chunk_rows=64, alpha_mlm=0.0, alpha_clm=2.0)), V - 1),
}


# fsdp8 splits the batch over the 8 devices as data=8 does, and the params too; pure data parallelism
# (replicated params, one all-reduce) is the same for every family and is tested on the DistilBERT
# step in tests/distill/test_meshes.py.
MESHES = {"fsdp8": shd.MeshConfig(data=1, fsdp=8), "fsdp2_tensor4": shd.MeshConfig(data=1, fsdp=2, tensor=4)}


def _sharded_run(family: str, mesh_cfg: shd.MeshConfig, devices):
    s_cfg, t_cfg, extra, pad = FAMILIES[family]
    extra = {"loss": LossConfig(chunk_rows=64), **extra}
    cfg = stp.StepConfig(optim=OptimConfig(learning_rate=1e-3, warmup_prop=0.0, total_steps=10, grad_accum_steps=2,
                                           weight_decay=0.01), **extra)
    t = tiny.build(cfg, s_cfg, t_cfg, mesh_cfg, devices, student_params=None,
                   compiler_options={"xla_backend_optimization_level": 0})
    metrics = [jax.device_get(t.step(fixed_batch(V, pad, rows=16, seed=i))) for i in range(3)]
    return metrics, jax.device_get(t.state.params)


@pytest.fixture(scope="module")
def single_device_runs():
    return {family: _sharded_run(family, shd.MeshConfig(data=1), jax.devices()[:1]) for family in FAMILIES}


@pytest.mark.slow
@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_sharded_step_equals_single_device(single_device_runs, family, mesh):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets them up on CPU)")
    ref_metrics, ref_params = single_device_runs[family]
    metrics, params = _sharded_run(family, MESHES[mesh], jax.devices()[:8])
    for i, (m, r) in enumerate(zip(metrics, ref_metrics)):
        jax.tree_util.tree_map_with_path(
            lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5,
                                                          err_msg=f"step {i} {jax.tree_util.keystr(path)}"), m, r)
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"]
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        params, ref_params)


def test_gpt2_recipe_as_terms_equals_the_loss_section():
    """configs/distilgpt2.yaml's objective (terms kl 5, clm_ce 2, hidden_cos 1, the alphas 0) and the
    loss section's alpha_ce 5 / alpha_clm 2 / alpha_cos 1 give the same losses and updates on a tiny
    GPT-2 pair (a 2-layer student of a 3-layer teacher), for two steps."""
    from jaxdistil.distill.config import load_run_config

    s_cfg, t_cfg, _, pad = FAMILIES["gpt2"]
    recipe = load_run_config("distilgpt2")
    optim = OptimConfig(learning_rate=1e-3, warmup_prop=0.0, total_steps=10)
    section = stp.StepConfig(loss=LossConfig(alpha_ce=5.0, alpha_mlm=0.0, alpha_clm=2.0, alpha_cos=1.0, chunk_rows=64),
                             optim=optim, causal=True)
    terms = stp.StepConfig(loss=dataclasses.replace(recipe.loss, chunk_rows=64), terms=recipe.terms, optim=optim,
                           causal=True)
    a, b = (tiny.build(c, s_cfg, t_cfg, student_params=None) for c in (section, terms))
    for i in range(2):
        batch = fixed_batch(V, pad, rows=8, seed=i)
        ma, mb = jax.device_get(a.step(batch)), jax.device_get(b.step(batch))
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5)
        assert mb["loss_kl"] == pytest.approx(ma["loss_ce"], rel=1e-5)
        assert mb["loss_clm_ce"] == pytest.approx(ma["loss_clm"], rel=1e-5)
        assert mb["loss_hidden_cos"] == pytest.approx(ma["loss_cos"], rel=1e-5, abs=1e-7)
