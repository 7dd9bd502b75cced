"""The run config's ``terms:`` wired into the distillation step (``DistillObjective`` with
``StepConfig.terms``): config errors before anything runs, the step's term metrics against numpy on
the models' own outputs, training moving a term, the shipped recipes, and meshes vs one device.
The terms' formulas themselves are checked against PyTorch in tests/distill/test_terms.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tiny

from jaxdistil.config import dump_config
from jaxdistil.distill.config import config_from_dict, load_run_config
from jaxdistil.distill.losses import LossConfig
from jaxdistil.distill.objective import StepConfig, term_projection_name
from jaxdistil.distill.terms import TermConfig
from jaxdistil.errors import UserError
from jaxdistil.models import BertConfig
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig

ONLY_TERMS = LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0)
NARROW = {"dim": 32, "n_heads": 8, "hidden_dim": 64}  # the teacher is 64 wide, 8 heads


def _cfg(*terms: TermConfig, loss: LossConfig = ONLY_TERMS, **kw) -> StepConfig:
    return StepConfig(loss=loss, optim=OptimConfig(total_steps=10, learning_rate=1e-3), mask_id=tiny.MASK_ID,
                      terms=terms, **kw)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("entry,words", [
    ({"kind": "tinybert"}, "unknown term kind 'tinybert'"),
    ({"kind": "kl"}, "kl is a logit term, set by the loss section"),
    ({"kind": "hidden_mse", "beta": 0.5}, "term hidden_mse has no option 'beta'"),
    ({"kind": "attention_kl", "projection": True}, "attention_kl takes no projection"),
    ({"kind": "hidden_mse", "layers": [[0, 0, 1]]}, "layers must be a non-empty list of [student_layer, teacher_layer]"),
    ({"kind": "hidden_mse", "weight": -1.0}, "weight must be >= 0"),
    ({"kind": "hidden_mse", "teacher": "bert-large"}, "a run has one teacher for now"),
    ({"kind": "hidden_mse", "alpha": 1.0}, "unknown config key 'terms[0].alpha'"),
])
def test_bad_term_entries_are_refused_in_one_line(entry, words):
    with pytest.raises(UserError) as err:
        config_from_dict({"terms": [entry]})
    assert words in _one_line(err)


def test_terms_round_trip_through_yaml():
    cfg = config_from_dict({"terms": [{"kind": "hidden_mse", "layers": [[0, 0], [2, 4]], "projection": True},
                                      {"kind": "minilmv2_relations", "relation_heads": 4}]})
    assert cfg.terms[0].layers == ((0, 0), (2, 4)) and cfg.terms[1].relation_heads == 4
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg
    assert config_from_dict({}, ["terms=[{kind: hidden_cos}]"]).terms == (TermConfig("hidden_cos"),)


@pytest.mark.parametrize("terms,s_kw,words", [
    ((TermConfig("hidden_mse", layers=((3, 0),)),), {}, "student layer 3 of pair [3, 0] is out of range"),
    ((TermConfig("attention_mse", layers=((0, 2),)),), {}, "teacher layer 2 of pair [0, 2] is out of range"),
    ((TermConfig("hidden_mse"),), NARROW, "student width 32 differs from teacher width 64"),
    ((TermConfig("attention_kl"),), {"n_heads": 4}, "minilmv2_relations"),
    ((TermConfig("minilmv2_relations", relation_heads=5),), {}, "terms[0] (minilmv2_relations)"),
])
def test_terms_that_do_not_fit_the_models_are_refused_before_compiling(terms, s_kw, words):
    with pytest.raises(UserError) as err:
        tiny.build(_cfg(*terms), s_cfg=tiny.student_cfg(**s_kw))
    assert words in _one_line(err)


def test_terms_need_a_teacher_one_micro_batch_and_batch_means():
    with pytest.raises(UserError) as err:
        tiny.build(_cfg(TermConfig("hidden_cos"), loss=LossConfig(alpha_ce=0.0, alpha_cos=0.0)), t_cfg=None)
    assert "needs a teacher" in _one_line(err)
    with pytest.raises(UserError) as err:
        StepConfig(optim=OptimConfig(grad_accum_steps=2), terms=(TermConfig("hidden_cos"),))
    assert "optim.grad_accum_steps=1" in _one_line(err)
    with pytest.raises(UserError) as err:
        StepConfig(loss=LossConfig(normalize="group"), group_rows=4, terms=(TermConfig("hidden_cos"),))
    assert "loss.normalize=batch" in _one_line(err)


def _outputs(model, params, ids, batch):
    kw = {k: batch[k] for k in ("attention_mask", "segment_ids", "position_ids") if k in batch}
    return model.apply({"params": params}, ids, method="encode", outputs=("attentions",), **kw)


def test_step_metrics_are_the_terms_of_the_models_outputs():
    """One update of a narrower student (32 wide vs 64, same 8 heads) with a projected hidden MSE on
    the embeddings and the last layer, and MiniLM's attention KL on layer 1: the step's metrics
    equal the formulas in numpy on the two models' outputs for the batch as the step masked it, and
    the total is their weighted sum."""
    terms = (TermConfig("hidden_mse", weight=2.0, layers=((0, 0), (2, 2)), projection=True),
             TermConfig("attention_kl", weight=0.5, layers=((1, 1),)))
    t = tiny.build(_cfg(*terms), s_cfg=tiny.student_cfg(**NARROW))
    batch = tiny.packed_batch(3)
    params, extra = jax.device_get(t.state.params), jax.device_get(t.state.extra)
    key = jax.random.fold_in(t.state.rng, t.state.step)
    inputs, _ = t.built.objective.prepare(t.built.shard_batch(batch), t.consts, key)
    ids = np.asarray(inputs["input_ids"])
    metrics = jax.device_get(t.step(batch))

    s_out = _outputs(t.built.student, params, ids, batch)
    t_out = _outputs(t.built.teacher, jax.device_get(t.teacher_params), ids, batch)
    real = batch["attention_mask"].astype(bool)
    proj = extra[term_projection_name(0)]
    mse = 0.0
    for i, j in ((0, 0), (2, 2)):
        diff = np.asarray(s_out.hidden_states[i]) @ proj["kernel"] + proj["bias"] - np.asarray(t_out.hidden_states[j])
        mse += (diff[real] ** 2).sum()
    mse /= real.sum() * 64
    # KL(teacher || student) per head and real query row, over the keys each row sees.
    p, q = np.asarray(t_out.attentions[1], np.float64), np.asarray(s_out.attentions[1], np.float64)
    kl = np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(np.maximum(q, 1e-30))), 0).sum(-1)  # [B, N, T]
    kl = kl.transpose(0, 2, 1)[real].sum() / (real.sum() * 8)
    assert metrics["loss_hidden_mse"] == pytest.approx(mse, rel=1e-5)
    assert metrics["loss_attention_kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert metrics["loss"] == pytest.approx(2.0 * mse + 0.5 * kl, rel=1e-5)
    assert metrics["sums"]["term0_count"] == real.sum() * 64


def test_training_on_terms_alone_moves_them():
    """Hidden MSE on every layer pair and MiniLMv2 relations, nothing else: a few updates lower both,
    and the projection (an extra module of the objective) trains with the student."""
    terms = (TermConfig("hidden_mse", layers=((0, 0), (1, 1), (2, 2)), projection=True),
             TermConfig("minilmv2_relations", layers=((1, 1),), relation_heads=4))
    t = tiny.build(_cfg(*terms), s_cfg=tiny.student_cfg(**NARROW))
    proj0 = jax.device_get(t.state.extra[term_projection_name(0)]["kernel"])
    batch = tiny.random_batch(0)
    first = jax.device_get(t.step(batch))
    for _ in range(6):
        last = jax.device_get(t.step(batch))
    assert last["loss_hidden_mse"] < 0.95 * first["loss_hidden_mse"]
    assert last["loss_minilmv2_relations"] < first["loss_minilmv2_relations"]
    assert not np.allclose(jax.device_get(t.state.extra[term_projection_name(0)]["kernel"]), proj0)


@pytest.mark.parametrize("name", ["tinybert-general", "minilmv2-base"])
def test_shipped_recipes_fit_their_models(name):
    """The recipes' terms against their real shapes (bert-base teacher, the configured student):
    layer maps, head counts and relation heads fit (checked on shapes, no weights)."""
    from jaxdistil.distill.builder import DistillStep, run_step_spec
    from jaxdistil.students import student_shape

    cfg = load_run_config(name)
    assert cfg.terms and cfg.optim.grad_accum_steps == 1
    teacher = BertConfig()  # bert-base-uncased's shape
    student = student_shape(cfg, teacher, teacher.vocab_size, 0)
    spec = run_step_spec(cfg, student, teacher, mask_id=103, total_steps=10)
    built = DistillStep(spec, devices=jax.devices()[:1])  # builds the models and checks every term
    assert len(built.objective.term_names) == len(cfg.terms)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=2, fsdp=2, tensor=2)], ids=["data8", "data2_fsdp2_tensor2"])
def test_terms_under_a_mesh_equal_one_device(mesh):
    terms = (TermConfig("hidden_mse", layers=((0, 0), (2, 2))),
             TermConfig("attention_mse", layers=((1, 1),)),
             TermConfig("value_relation_kl", weight=0.3, layers=((0, 1),)),
             TermConfig("minilmv2_relations", layers=((1, 0),), relation_heads=4))
    cfg = _cfg(*terms, loss=LossConfig(alpha_cos=0.5))
    batch = tiny.packed_batch(5)
    one = tiny.build(cfg, compiler_options=tiny.FAST_COMPILE)
    many = tiny.build(cfg, mesh=shd.MeshConfig(**mesh), devices=jax.devices()[:8], compiler_options=tiny.FAST_COMPILE)
    for _ in range(2):
        a, b = jax.device_get(one.step(batch)), jax.device_get(many.step(batch))
        for key in ("loss", "loss_ce", "loss_mlm", "loss_hidden_mse", "loss_attention_mse",
                    "loss_value_relation_kl", "loss_minilmv2_relations"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
