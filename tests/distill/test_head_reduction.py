"""The chunked loss under a device mesh: exact (values and gradients equal the plain loss on one
device) and with no per-chunk collective in the compiled step (the MLM head's weight gradient is
reduced over the batch shards once per step, however many chunks the loss runs).

On 8 CPU devices (tests/conftest.py sets XLA_FLAGS)."""

from __future__ import annotations

import functools
import json

import jax
import numpy as np
import pytest

from jaxdistil import cli
from jaxdistil.distill.losses import (
    LossConfig,
    combine_losses,
    loss_counts,
    loss_sums,
    plain_loss_sums,
    shard_rows_bound,
)
from jaxdistil.models import BertConfig, DistilBertConfig, build_model, init_params, save_config
from jaxdistil.training import sharding as shd

B, T, D, V = 8, 32, 16, 96


def _needs_8_devices():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets them up on CPU)")


@functools.cache
def _setup():
    cfg = DistilBertConfig(vocab_size=V, dim=D, n_heads=2, hidden_dim=32, n_layers=1, max_position_embeddings=T)
    model = build_model(cfg)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    # Larger than BERT's init (0.02), so every head parameter gets a clear gradient.
    student, teacher = (jax.tree.map(lambda x: 0.5 * jax.random.normal(k, x.shape), init_params(model, k))
                        for k in keys)
    rng = np.random.default_rng(0)
    sh = rng.normal(size=(B, T, D)).astype(np.float32)
    th = (0.6 * sh + 0.8 * rng.normal(size=(B, T, D))).astype(np.float32)
    lengths = rng.integers(T // 2, T + 1, size=B)
    am = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
    labels = np.full((B, T), -100, np.int32)
    # 4 masked rows in every sequence but the first, which gets 16 (44 in all): with max_rows=24,
    # shard 0 overflows its per-shard bound, so the fallback case really falls back.
    for i in range(B):
        pos = rng.choice(lengths[i], size=16 if i == 0 else 4, replace=False)
        labels[i, pos] = rng.integers(0, V, size=pos.size)
    return model, student, teacher, sh, th, am, labels


CASES = {
    # name: (LossConfig kwargs, max_rows, with teacher)
    # data=8: 32 rows per shard, chunks of 16 // 8 = 2 rows: 16 chunks.
    "all_rows_chunked": (dict(chunk_rows=16, alpha_mse=0.2), None, True),
    "restrict_gathered_chunked": (dict(chunk_rows=8, restrict_ce_to_mask=True), 48, True),
    "restrict_overflow_fallback": (dict(chunk_rows=8, restrict_ce_to_mask=True), 24, True),
    "mlm_only_gathered_chunked": (dict(chunk_rows=8, alpha_ce=0.0, alpha_cos=0.0), 48, False),
}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_text", ["data=8", "fsdp=8", "data=2,fsdp=2,tensor=2"])
@pytest.mark.parametrize("case", list(CASES))
def test_sharded_chunked_loss_equals_plain(mesh_text, case):
    _needs_8_devices()
    kwargs, max_rows, with_teacher = CASES[case]
    cfg = LossConfig(**kwargs)
    model, sp, tp, sh, th, am, labels = _setup()
    counts = loss_counts(labels, am, cfg)
    mesh = shd.make_mesh(shd.MeshConfig.parse(mesh_text))
    rules = shd.RULES

    def head_fn(params, h):
        return model.apply({"params": params}, h, method="mlm_logits")

    t_head = (lambda h: head_fn(tp, h)) if with_teacher else None
    th_in = th if with_teacher else None

    def sharded_loss(params, hidden):
        with shd.activation_rules(mesh, rules):
            sums = loss_sums(hidden, th_in, (head_fn, params), t_head, labels, am, cfg, max_rows=max_rows)
        return combine_losses(sums, counts, cfg)[0]

    def plain_loss(params, hidden):
        sums = plain_loss_sums(hidden, th_in, lambda h: head_fn(params, h), t_head, labels, am, cfg)
        return combine_losses(sums, counts, cfg)[0]

    p_shard = shd.param_shardings(model, mesh, rules)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(shd.BATCH_AXES))
    sharded = jax.jit(jax.value_and_grad(sharded_loss, argnums=(0, 1)), in_shardings=(p_shard, rows))
    v_sh, (gp_sh, gh_sh) = sharded(jax.device_put(sp, p_shard), jax.device_put(sh, rows))
    v_1, (gp_1, gh_1) = jax.jit(jax.value_and_grad(plain_loss, argnums=(0, 1)))(sp, sh)

    np.testing.assert_allclose(float(v_sh), float(v_1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gh_sh), np.asarray(gh_1), rtol=1e-5, atol=1e-5)
    flat_1 = dict(jax.tree_util.tree_leaves_with_path(gp_1))
    head_grads = 0
    for path, g in jax.tree_util.tree_leaves_with_path(gp_sh):
        name = jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_1[path]), rtol=1e-5, atol=1e-5, err_msg=name)
        head_grads += ("mlm" in name or "word_embeddings" in name) and float(np.abs(flat_1[path]).max()) > 1e-4
    assert head_grads >= 4  # transform, norm, bias, tied embedding: the comparison is not vacuous


@pytest.mark.slow
def test_cases_take_the_gathered_and_fallback_paths():
    """The cases above take the paths they are named for: with max_rows=48 every shard fits its
    bound (gathered); with 24, shard 0 of data=8 (and of data=2,fsdp=2) does not (fallback)."""
    *_, labels = _setup()
    for shards in (8, 4):
        per_shard = (labels != -100).reshape(shards, -1).sum(axis=1)
        assert per_shard.max() <= shard_rows_bound(48, B * T, shards) < B * T // shards
        assert per_shard.max() > shard_rows_bound(24, B * T, shards)


# --------------------------------------------------------------------------------------------------
# The compiled train step, through `jaxdistil shard-study`
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    save_config(BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=16), path)
    return path


def _study(teacher_dir, out, *extra):
    # 8 x 16 = 128 rows in chunks of 16: 8 chunks (2 rows per shard and chunk under data=8).
    argv = ["shard-study", "data=8", "fsdp=8", f"teacher.model={teacher_dir}", "student.layers=0",
            "--batch", "8", "--seq", "16", "--steps", "1", "--warmup", "1", "--output", str(out),
            "--compiler-option", "xla_backend_optimization_level=0", "loss.chunk_rows=16", *extra]
    assert cli.main(argv) == 0
    doc = json.loads((out / "shard_study.json").read_text())
    return {s["mesh"]: s for s in doc["strategies"]}


def _per_loop_ops(row):
    """Collectives that run more than once per step outside the layer stack (the encoder's scanned
    layers gather or reduce once per layer, by design)."""
    return [op for op in row["collectives"]["in_loops"] if "/encoder/" not in op["op_name"]]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("loss.restrict_ce_to_mask=true",)], ids=["all_rows", "restrict"])
def test_head_gradient_reduced_once_per_step(teacher_dir, tmp_path, extra):
    _needs_8_devices()
    rows = _study(teacher_dir, tmp_path / "study", *extra)
    data, fsdp = rows["data=8"], rows["fsdp=8"]
    assert _per_loop_ops(data) == [] and _per_loop_ops(fsdp) == []
    # Data parallel: the gradients are all-reduced once per step: the student's fp32 gradient bytes,
    # plus at most the tied word embedding a second time (its lookup and head contributions are
    # reduced separately). A reduction per chunk would add 7 more head gradients (8 chunks).
    grad_bytes = data["student_param_bytes"]
    embedding = 256 * 32 * 4
    assert grad_bytes <= data["all_reduce_bytes"] <= grad_bytes + embedding + 1024
    assert data["collectives"]["count"]["all-reduce"] == data["collectives"]["static_count"]["all-reduce"] or extra
    assert rows["data=8"]["loss_agrees"] and rows["fsdp=8"]["loss_agrees"]
