"""Student initialisation from teacher layers (jaxdistil.students)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from families import hf_model, ragged_batch

from jaxdistil import cli
from jaxdistil.errors import UserError
from jaxdistil.hf import load_model, save_flax_model
from jaxdistil.models import BertConfig, DistilBertConfig, build_model, config_from_hf_dict, init_params
from jaxdistil.students import PAPER_LAYERS, student_from_teacher


def tiny_bert(layers: int, **kw) -> BertConfig:
    fields = {
        "vocab_size": 97,
        "hidden_size": 32,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 48,
        "max_position_embeddings": 40,
    }
    fields.update(kw)
    return BertConfig(**fields)


def random_params(cfg, seed=0):
    """Random params of the model of ``cfg``: every tensor (biases and LayerNorms included) is
    random, so copying the wrong tensor, or not copying one, cannot go unnoticed."""
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(s.dtype), shapes)


@pytest.mark.parametrize("fold", [False, True])
def test_paper_layers_map_teacher_tensors(fold):
    tcfg = tiny_bert(12)
    t = random_params(tcfg)
    cfg, s, notes = student_from_teacher(tcfg, t, PAPER_LAYERS, fold_token_types=fold)

    assert isinstance(cfg, DistilBertConfig)
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.hidden_dim, cfg.vocab_size) == (6, 32, 4, 48, 97)
    assert "token_type_embeddings" not in s["embeddings"]
    np.testing.assert_array_equal(
        s["embeddings"]["word_embeddings"]["embedding"], t["embeddings"]["word_embeddings"]["embedding"]
    )
    pos = t["embeddings"]["position_embeddings"]["embedding"]
    if fold:
        pos = pos + t["embeddings"]["token_type_embeddings"]["embedding"][0]
    np.testing.assert_array_equal(s["embeddings"]["position_embeddings"]["embedding"], pos)
    for name in ("scale", "bias"):
        np.testing.assert_array_equal(s["embeddings"]["LayerNorm"][name], t["embeddings"]["LayerNorm"][name])
    # Student layer i is teacher layer PAPER_LAYERS[i], for every stacked tensor.
    flat_s = jax.tree_util.tree_leaves_with_path(s["encoder"]["layers"])
    flat_t = dict(jax.tree_util.tree_leaves_with_path(t["encoder"]["layers"]))
    assert len(flat_s) == 16
    for path, leaf in flat_s:
        for i, j in enumerate(PAPER_LAYERS):
            np.testing.assert_array_equal(leaf[i], flat_t[path][j], err_msg=jax.tree_util.keystr(path))
    for path, leaf in jax.tree_util.tree_leaves_with_path(s["mlm_head"]):
        want = dict(jax.tree_util.tree_leaves_with_path(t["mlm_head"]))[path]
        np.testing.assert_array_equal(leaf, want, err_msg=jax.tree_util.keystr(path))
    # The student's tree is exactly that of a DistilBERT of this config.
    fresh = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(1)))
    assert jax.tree.structure(fresh) == jax.tree.structure(s)
    assert all(
        a.shape == b.shape and a.dtype == b.dtype for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(s))
    )
    assert any("token_type" in n for n in notes)


_APPLY = {}


def _logits(cfg, params, ids, **kw):
    """Logits [B, T, V] of the model of ``cfg`` (one compiled function per config and input set)."""
    key = (cfg, tuple(sorted(kw)))
    if key not in _APPLY:
        _APPLY[key] = jax.jit(lambda p, i, kw: build_model(cfg).apply({"params": p}, i, **kw).logits)
    return np.asarray(_APPLY[key](params, jnp.asarray(ids), {k: jnp.asarray(v) for k, v in kw.items()}))


def test_one_layer_student_equals_one_layer_teacher():
    tcfg = tiny_bert(1)
    t = random_params(tcfg, seed=3)
    ids = np.random.default_rng(0).integers(0, tcfg.vocab_size, (3, 17))
    mask = np.ones_like(ids)
    mask[1, 12:] = 0
    teacher = _logits(tcfg, t, ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))

    # Folding the token-type row into the positions: equal on token-type-0 input.
    cfg, s, _ = student_from_teacher(tcfg, t, [0])
    student = _logits(cfg, s, ids, attention_mask=mask)
    assert np.abs(student - teacher).max() < 1e-5

    # The reference's plain drop: equal when the teacher has no token-type signal (zero table).
    t0 = jax.tree.map(np.copy, t)
    t0["embeddings"]["token_type_embeddings"]["embedding"][:] = 0.0
    teacher0 = _logits(tcfg, t0, ids, attention_mask=mask, token_type_ids=np.zeros_like(ids))
    cfg0, s0, _ = student_from_teacher(tcfg, t0, [0], fold_token_types=False)
    np.testing.assert_array_equal(_logits(cfg0, s0, ids, attention_mask=mask), teacher0)
    # ... and differs by the dropped row otherwise, which is why folding is the default.
    _, s_drop, _ = student_from_teacher(tcfg, t, [0], fold_token_types=False)
    assert np.abs(_logits(cfg, s_drop, ids, attention_mask=mask) - teacher).max() > 1e-3


def test_options_and_errors():
    tcfg = tiny_bert(4)
    t = random_params(tcfg)
    _, s, notes = student_from_teacher(tcfg, t, [3, 0], vocab_transform=False)
    np.testing.assert_array_equal(
        s["encoder"]["layers"]["lin1"]["kernel"][0], t["encoder"]["layers"]["lin1"]["kernel"][3]
    )
    # Without vocab_transform, as the reference: neither the transform dense nor its LayerNorm is
    # copied; both keep transformers' fresh init (N(0, initializer_range) kernel, zero bias, unit
    # LayerNorm); the output bias is copied.
    dense, norm = s["mlm_head"]["transform"], s["mlm_head"]["transform_norm"]
    assert not np.array_equal(dense["kernel"], t["mlm_head"]["transform"]["kernel"])
    assert abs(float(dense["kernel"].std()) - tcfg.initializer_range) < 0.2 * tcfg.initializer_range
    np.testing.assert_array_equal(dense["bias"], np.zeros(32, np.float32))
    np.testing.assert_array_equal(norm["scale"], np.ones(32, np.float32))
    np.testing.assert_array_equal(norm["bias"], np.zeros(32, np.float32))
    np.testing.assert_array_equal(s["mlm_head"]["bias"], t["mlm_head"]["bias"])
    assert any("vocab transform" in n for n in notes)
    # With it (the default), all three are the teacher's.
    _, s_copy, _ = student_from_teacher(tcfg, t, [3, 0])
    for part in ("transform", "transform_norm"):
        for name, value in s_copy["mlm_head"][part].items():
            np.testing.assert_array_equal(value, t["mlm_head"][part][name], err_msg=f"{part}/{name}")

    # A teacher without MLM head (BertModel checkpoint): the head stays random, and says so.
    headless = {k: v for k, v in t.items() if k != "mlm_head"}
    _, s2, notes2 = student_from_teacher(tcfg, headless, [0, 1])
    assert s2["mlm_head"]["bias"].shape == (97,)
    assert any("no MLM head" in n for n in notes2)

    with pytest.raises(UserError, match="do not exist"):
        student_from_teacher(tcfg, t, [0, 4])
    with pytest.raises(UserError, match="at least one"):
        student_from_teacher(tcfg, t, [])
    with pytest.raises(UserError, match="shape"):
        student_from_teacher(tcfg, t, [0], overrides={"dim": 64})
    cfg, _, _ = student_from_teacher(tcfg, t, [0], overrides={"dropout": 0.0})
    assert cfg.dropout == 0.0


def test_cli_writes_flax_model_dir(tmp_path, capsys):
    tcfg = tiny_bert(4)
    t = random_params(tcfg)
    save_flax_model(tcfg, t, tmp_path / "teacher")
    out = tmp_path / "student"
    rc = cli.main(
        ["init-student", "--teacher", str(tmp_path / "teacher"), "--layers", "1,3", "--output", str(out)]
    )
    assert rc == 0
    loaded = load_model(str(out))
    cfg, s = loaded.config, loaded.params
    assert isinstance(cfg, DistilBertConfig) and cfg.n_layers == 2
    np.testing.assert_array_equal(
        s["encoder"]["layers"]["q_lin"]["kernel"][1], t["encoder"]["layers"]["q_lin"]["kernel"][3]
    )

    # Errors: one line, exit code 2.
    assert (
        cli.main(["init-student", "--teacher", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "does not exist" in err[0]
    assert (
        cli.main(
            [
                "init-student",
                "--teacher",
                str(tmp_path / "teacher"),
                "--layers",
                "0,9",
                "--output",
                str(tmp_path / "y"),
            ]
        )
        == 2
    )
    assert "do not exist" in capsys.readouterr().err
    assert (
        cli.main(
            ["init-student", "--teacher", str(tmp_path / "teacher"), "--layers", "0", "--output", str(out)]
        )
        == 2
    )
    assert "not empty" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_student_of_all_teacher_layers_is_the_teacher(kind):
    hf = hf_model(kind, std=0.1)
    cfg = config_from_hf_dict(hf.config.to_dict())
    from jaxdistil.hf.names import hf_to_flax

    params, _, _ = hf_to_flax({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    s_cfg, s_params, _ = student_from_teacher(cfg, params, layers=(0, 1, 2))
    assert type(s_cfg) is type(cfg)
    s_half, half, _ = student_from_teacher(cfg, params, layers=(0, 2))
    assert s_half.layers == 2
    np.testing.assert_array_equal(half["encoder"]["layers"]["lin1"]["kernel"][1],
                                  params["encoder"]["layers"]["lin1"]["kernel"][2])
    ids, mask = ragged_batch(hf.config.vocab_size, 1 if kind == "roberta" else hf.config.eos_token_id)
    a = build_model(cfg).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)).logits
    b = build_model(s_cfg).apply({"params": s_params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
