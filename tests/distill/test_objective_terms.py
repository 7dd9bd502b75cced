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


def _cfg(*terms: TermConfig, loss: LossConfig = ONLY_TERMS, accum: int = 1, **kw) -> StepConfig:
    return StepConfig(loss=loss, optim=OptimConfig(total_steps=10, learning_rate=1e-3, grad_accum_steps=accum),
                      mask_id=tiny.MASK_ID, terms=terms, **kw)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("entry,words", [
    ({"kind": "tinybert"}, "unknown term kind 'tinybert'"),
    ({"kind": "kl", "rows": "some"}, "rows must be one of all, masked"),
    ({"kind": "hidden_mse", "rows": "all"}, "hidden_mse takes no rows option"),
    ({"kind": "hidden_mse", "teacher": ["teacher", "b"]}, "only kl, reverse_kl, jsd mix several teachers"),
    ({"kind": "kl", "teacher": ["teacher", "teacher"]}, "several distinct ones"),
    ({"kind": "hidden_mse", "beta": 0.5}, "term hidden_mse has no option 'beta'"),
    ({"kind": "attention_kl", "projection": True}, "attention_kl takes no projection"),
    ({"kind": "hidden_mse", "layers": [[0, 0, 1]]}, "layers must be a non-empty list of [student_layer, teacher_layer]"),
    ({"kind": "hidden_mse", "weight": -1.0}, "weight must be >= 0"),
    ({"kind": "hidden_mse", "teacher": "bert-large"}, "names teacher 'bert-large'; the run's teachers are teacher"),
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


def test_terms_need_a_teacher_and_the_right_lm_loss():
    with pytest.raises(UserError) as err:
        tiny.build(_cfg(TermConfig("hidden_cos"), loss=LossConfig(alpha_ce=0.0, alpha_cos=0.0)), t_cfg=None)
    assert "needs a teacher" in _one_line(err)
    with pytest.raises(UserError) as err:
        _cfg(TermConfig("clm_ce"))
    assert "use kind: mlm_ce" in _one_line(err)
    with pytest.raises(UserError) as err:
        _cfg(TermConfig("mlm_ce"), causal=True)
    assert "use kind: clm_ce" in _one_line(err)
    # A term that is also a weighted shorthand term would count twice; the shorthand's row switch
    # does nothing for terms.
    with pytest.raises(UserError) as err:
        _cfg(TermConfig("kl"), loss=LossConfig())
    assert "repeats the loss section's loss.alpha_ce=5.0" in _one_line(err) and "set loss.alpha_ce=0" in str(err.value)
    with pytest.raises(UserError) as err:
        _cfg(TermConfig("hidden_cos"), loss=LossConfig(alpha_ce=0.0))
    assert "loss.alpha_cos=1.0" in _one_line(err)
    _cfg(TermConfig("hidden_cos", layers=((1, 1),)), loss=LossConfig(alpha_ce=0.0))  # another layer pair: fine
    with pytest.raises(UserError) as err:
        _cfg(TermConfig("kl"), loss=LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, restrict_ce_to_mask=True))
    assert "set rows: masked on the kl term" in _one_line(err)
    # MLM-only training written as a term: no teacher needed.
    t = tiny.build(_cfg(TermConfig("mlm_ce")), t_cfg=None)
    m = jax.device_get(t.step(tiny.random_batch(0)))
    assert m["loss"] == pytest.approx(m["loss_mlm_ce"]) and m["loss_mlm_ce"] == pytest.approx(m["loss_mlm"])


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
    assert metrics["counts"]["term0_count"] == real.sum() * 64


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


# The loss section's triple loss written as terms (what the shipped recipes do).
TRIPLE_AS_TERMS = (TermConfig("kl", weight=5.0, temperature=2.0), TermConfig("mlm_ce", weight=2.0),
                   TermConfig("hidden_cos", weight=1.0))


@pytest.mark.parametrize("variant", ["batch", "masked_rows", "group"])
def test_the_triple_loss_as_terms_equals_the_loss_section(variant):
    """DistilBERT's L_ce + L_mlm + L_cos from the loss section's alphas and from a terms: list (the
    loss section's alphas 0): the same losses and the same updates for three steps, also with the
    soft targets on the masked rows only (restrict_ce_to_mask) and with the reference's per-group
    means (normalize=group, 4 groups of 4 rows)."""
    kw = {"group_rows": 4} if variant == "group" else {}
    section = LossConfig(restrict_ce_to_mask=variant == "masked_rows", normalize="group" if variant == "group" else "batch")
    off = LossConfig(alpha_ce=0.0, alpha_mlm=0.0, alpha_cos=0.0, normalize=section.normalize)
    terms = TRIPLE_AS_TERMS
    if variant == "masked_rows":
        terms = (TermConfig("kl", weight=5.0, temperature=2.0, rows="masked"), *terms[1:])
    a = tiny.build(_cfg(loss=section, **kw))
    b = tiny.build(_cfg(*terms, loss=off, **kw))
    for seed in range(3):
        batch = tiny.random_batch(seed)
        ma, mb = jax.device_get(a.step(batch)), jax.device_get(b.step(batch))
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-5)
        assert mb["loss_kl"] == pytest.approx(ma["loss_ce"], rel=1e-5, abs=1e-7)
        assert mb["loss_hidden_cos"] == pytest.approx(ma["loss_cos"], rel=1e-5, abs=1e-7)
        assert mb["loss_mlm_ce"] == pytest.approx(ma["loss_mlm"], rel=1e-5)
        assert "loss_ce" not in mb  # the section's KL is not computed when only terms weigh it
    for x, y in zip(jax.tree.leaves(jax.device_get(a.state.params)), jax.tree.leaves(jax.device_get(b.state.params))):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _logits(model, params, ids, batch):
    kw = {k: batch[k] for k in ("attention_mask", "segment_ids", "position_ids") if k in batch}
    hidden = model.apply({"params": params}, ids, method="encode", **kw).last_hidden_state
    return np.asarray(model.apply({"params": params}, hidden, method="mlm_logits"), np.float64)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_two_teachers_terms_read_the_teachers_they_name():
    """A second teacher ("b", weight 3, other depth and width): a KL to the mixture of both teachers'
    soft targets (weights 1 : 3), a reverse KL to b alone on the masked rows, and a hidden MSE to
    b's layer 1 through a projection; the step's metrics equal numpy on the three models' outputs."""
    b_cfg = tiny.teacher_cfg(num_hidden_layers=3, hidden_size=48, num_attention_heads=4)
    terms = (TermConfig("kl", teacher=("teacher", "b"), temperature=2.0),
             TermConfig("reverse_kl", teacher="b", rows="masked", temperature=1.0),
             TermConfig("hidden_mse", teacher="b", layers=((1, 1),), projection=True))
    cfg = _cfg(*terms, teachers=(("teacher", 1.0), ("b", 3.0)))
    t = tiny.build(cfg, extra_teachers=(b_cfg,))
    batch = tiny.packed_batch(2)
    params, extra = jax.device_get(t.state.params), jax.device_get(t.state.extra)
    key = jax.random.fold_in(t.state.rng, t.state.step)
    inputs, _ = t.built.objective.prepare(t.built.shard_batch(batch), t.consts, key)
    ids, labels = np.asarray(inputs["input_ids"]), np.asarray(inputs["labels"])
    metrics = jax.device_get(t.step(batch))

    b_params = jax.device_get(t.consts["teachers"][0])
    s = _logits(t.built.student, params, ids, batch)
    ta = _logits(t.built.teacher, jax.device_get(t.teacher_params), ids, batch)
    tb = _logits(t.built.extra_teachers[0], b_params, ids, batch)
    real, masked = batch["attention_mask"].astype(bool), labels != -100
    log_q2 = _log_softmax(s / 2.0)
    p_mix = 0.25 * np.exp(_log_softmax(ta / 2.0)) + 0.75 * np.exp(_log_softmax(tb / 2.0))
    kl = (p_mix * (np.log(p_mix) - log_q2)).sum(-1)[real].mean() * 4.0
    q1 = np.exp(_log_softmax(s))
    rkl = (q1 * (np.log(q1) - _log_softmax(tb))).sum(-1)[masked].mean()
    s_h = t.built.student.apply({"params": params}, ids, method="encode", attention_mask=batch["attention_mask"],
                                segment_ids=batch["segment_ids"], position_ids=batch["position_ids"]).hidden_states[1]
    b_h = t.built.extra_teachers[0].apply({"params": b_params}, ids, method="encode",
                                          attention_mask=batch["attention_mask"], segment_ids=batch["segment_ids"],
                                          position_ids=batch["position_ids"]).hidden_states[1]
    proj = extra[term_projection_name(2)]
    assert proj["kernel"].shape == (64, 48)
    diff = np.asarray(s_h) @ proj["kernel"] + proj["bias"] - np.asarray(b_h)
    mse = (diff[real] ** 2).sum() / (real.sum() * 48)
    assert metrics["loss_kl"] == pytest.approx(kl, rel=1e-5)
    assert metrics["loss_reverse_kl"] == pytest.approx(rkl, rel=1e-5)
    assert metrics["loss_hidden_mse"] == pytest.approx(mse, rel=1e-5)


def test_teacher_mistakes_are_refused_in_one_line():
    wide_vocab = tiny.teacher_cfg(vocab_size=tiny.V + 8)
    two = (("teacher", 1.0), ("b", 1.0))
    with pytest.raises(UserError) as err:
        tiny.build(_cfg(TermConfig("kl", teacher=("teacher", "b")), teachers=two), extra_teachers=(wide_vocab,))
    assert "mixes teachers with different vocabularies: teacher (128), b (136)" in _one_line(err)
    with pytest.raises(UserError) as err:
        tiny.build(_cfg(TermConfig("logits_mse", teacher="b"), teachers=two), extra_teachers=(wide_vocab,))
    assert "teacher b has a vocabulary of 136 tokens, the student 128" in _one_line(err)
    with pytest.raises(UserError) as err:
        tiny.build(_cfg(TermConfig("hidden_mse"), teachers=two), extra_teachers=(tiny.teacher_cfg(),))
    assert "teacher b is named by no term" in _one_line(err)
    with pytest.raises(UserError) as err:
        _cfg(TermConfig("hidden_mse", teacher="c"), teachers=two)
    assert "names teacher 'c'; the run's teachers are teacher, b" in _one_line(err)
    # A padded vocabulary is fine for a teacher that only hidden-state terms read.
    tiny.build(_cfg(TermConfig("hidden_mse", teacher="b"), teachers=two), extra_teachers=(wide_vocab,))
    for raw, words in [
        ({"teachers": [{"name": "b", "model": "x"}]}, "teacher.model is not set"),
        ({"teacher": {"model": "x"}, "teachers": [{"name": "b"}]}, "teachers[0] (b) has no model"),
        ({"teacher": {"model": "x"}, "teachers": [{"name": "teacher", "model": "y"}]}, "'teacher' is used twice"),
        ({"teacher": {"model": "x"}, "teachers": [{"name": "b", "model": "y", "weight": 0}]}, "weight must be"),
    ]:
        with pytest.raises(UserError) as err:
            config_from_dict(raw)
        assert words in _one_line(err)


def test_terms_with_gradient_accumulation_equal_one_batch():
    """Every kind of term (a soft target, a hidden-state term with a projection, attention terms) with
    two micro-batches per update: the same losses and update as one batch (no dropout): each term's
    denominator is the whole batch's, counted before the forward passes."""
    terms = (TermConfig("jsd", beta=0.4), TermConfig("hidden_mse", layers=((0, 0), (2, 2)), projection=True),
             TermConfig("attention_mse", layers=((1, 1),)), TermConfig("minilmv2_relations", relation_heads=4))
    cfg1 = _cfg(*terms, loss=LossConfig())
    cfg2 = _cfg(*terms, loss=LossConfig(), accum=2)
    a, b = tiny.build(cfg1), tiny.build(cfg2)
    batch = tiny.packed_batch(4)
    ma, mb = jax.device_get(a.step(batch)), jax.device_get(b.step(batch))
    for key in ("loss", "loss_ce", "loss_jsd", "loss_hidden_mse", "loss_attention_mse", "loss_minilmv2_relations"):
        assert mb[key] == pytest.approx(ma[key], rel=1e-5), key
    assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-5)
    for x, y in zip(jax.tree.leaves(jax.device_get(a.state.params)), jax.tree.leaves(jax.device_get(b.state.params))):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


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
    """Every family of term, two teachers (a mixture KL, a reverse KL on masked rows, hidden and
    attention terms to either) under data / fsdp / tensor meshes: the same metrics as one device."""
    terms = (TermConfig("hidden_mse", layers=((0, 0), (2, 2))),
             TermConfig("attention_mse", layers=((1, 1),)),
             TermConfig("value_relation_kl", weight=0.3, layers=((0, 1),), teacher="b"),
             TermConfig("minilmv2_relations", layers=((1, 0),), relation_heads=4),
             TermConfig("kl", teacher=("teacher", "b")),
             TermConfig("reverse_kl", teacher="b", rows="masked"),
             TermConfig("logits_mse", weight=0.01))
    cfg = _cfg(*terms, loss=LossConfig(alpha_cos=0.5), teachers=(("teacher", 1.0), ("b", 2.0)))
    extra = (tiny.teacher_cfg(num_hidden_layers=3),)
    batch = tiny.packed_batch(5)
    one = tiny.build(cfg, compiler_options=tiny.FAST_COMPILE, extra_teachers=extra)
    many = tiny.build(cfg, mesh=shd.MeshConfig(**mesh), devices=jax.devices()[:8], compiler_options=tiny.FAST_COMPILE,
                      extra_teachers=extra)
    for _ in range(2):
        a, b = jax.device_get(one.step(batch)), jax.device_get(many.step(batch))
        for key in ("loss", "loss_ce", "loss_mlm", "loss_hidden_mse", "loss_attention_mse",
                    "loss_value_relation_kl", "loss_minilmv2_relations", "loss_kl", "loss_reverse_kl",
                    "loss_logits_mse"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
