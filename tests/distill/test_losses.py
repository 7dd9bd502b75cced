"""Tests of jaxdistil.distill.losses: parity with torch.nn.functional, chunked == plain (values and
gradients), finite-difference gradients, compiled temporary memory, MLM-only mode."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.distill.losses import (
    LossConfig,
    ce_loss,
    combine_losses,
    cos_loss,
    loss_counts,
    loss_sums,
    max_masked_rows,
    mlm_loss,
    mse_loss,
    plain_loss_sums,
    shard_rows_bound,
)
from jaxdistil.errors import UserError
from jaxdistil.models import DistilBertConfig, build_model, init_params

B, T, D, V = 3, 12, 16, 97
LENGTHS = (12, 9, 5)  # padding in rows 1 and 2


def _batch(seed: int = 0, n_masked: int = 7):
    """Hidden states, padded attention mask and labels at n_masked real positions."""
    rng = np.random.default_rng(seed)
    sh = rng.normal(size=(B, T, D)).astype(np.float32)
    th = (0.6 * sh + 0.8 * rng.normal(size=(B, T, D))).astype(np.float32)
    am = (np.arange(T)[None] < np.array(LENGTHS)[:, None]).astype(np.int32)
    real = np.flatnonzero(am.reshape(-1))
    chosen = rng.choice(real, size=n_masked, replace=False)
    labels = np.full(B * T, -100, np.int64)
    labels[chosen] = rng.integers(0, V, size=n_masked)
    return sh, th, am, labels.reshape(B, T).astype(np.int32)


def _linear_heads(seed: int = 1):
    rng = np.random.default_rng(seed)
    ws = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    wt = (rng.normal(size=(D, V)) / 2).astype(np.float32)
    bs = rng.normal(size=(V,)).astype(np.float32)
    return ws, wt, bs


def _torch_losses(s_logits, t_logits, s_hidden, t_hidden, am, labels, cfg: LossConfig):
    """The reference distiller's computation with torch.nn.functional (float32)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s, t = torch.from_numpy(s_logits), torch.from_numpy(t_logits)
    lab = torch.from_numpy(labels.astype(np.int64))
    amask = torch.from_numpy(am).bool()
    rows = (lab > -1) if cfg.restrict_ce_to_mask else amask
    s_sel, t_sel = s[rows], t[rows]  # [rows, V]
    temp = cfg.temperature
    l_ce = F.kl_div(F.log_softmax(s_sel / temp, -1), F.softmax(t_sel / temp, -1), reduction="batchmean") * temp**2
    l_mlm = F.cross_entropy(s.view(-1, s.size(-1)), lab.view(-1), ignore_index=-100)
    l_mse = F.mse_loss(s_sel, t_sel, reduction="sum") / s_sel.size(0)
    sh, th = torch.from_numpy(s_hidden)[amask], torch.from_numpy(t_hidden)[amask]
    l_cos = F.cosine_embedding_loss(sh, th, torch.ones(sh.size(0)), reduction="mean")
    acc = (s.argmax(-1)[lab > -1] == lab[lab > -1]).float().mean()
    total = cfg.alpha_ce * l_ce + cfg.alpha_mlm * l_mlm + cfg.alpha_cos * l_cos + cfg.alpha_mse * l_mse
    return {"loss_ce": l_ce, "loss_mlm": l_mlm, "loss_cos": l_cos, "loss_mse": l_mse,
            "mlm_accuracy": acc, "loss": total}


@pytest.mark.slow
@pytest.mark.parametrize("restrict", [False, True])
def test_parity_with_torch(restrict):
    sh, th, am, labels = _batch(n_masked=9)
    ws, wt, bs = _linear_heads()
    # Make the student right on a few masked rows so mlm_accuracy is neither 0 nor 1.
    cfg = LossConfig(alpha_mse=0.3, restrict_ce_to_mask=restrict, chunk_rows=5)
    s_logits = sh @ ws + bs
    t_logits = th @ wt
    expected = {k: float(v) for k, v in _torch_losses(s_logits, t_logits, sh, th, am, labels, cfg).items()}

    s_head = lambda h: h @ ws + bs  # noqa: E731
    t_head = lambda h: h @ wt  # noqa: E731
    fn = jax.jit(lambda sh, th, labels, am: loss_sums(
        sh, th, s_head, t_head, labels, am, cfg, max_rows=max_masked_rows(B, T, 0.3)))
    sums = fn(sh, th, labels, am)
    _, metrics = combine_losses(sums, loss_counts(labels, am, cfg), cfg)
    for key, value in expected.items():
        np.testing.assert_allclose(float(metrics[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
    for key in sums:
        assert sums[key].dtype == jnp.float32 and sums[key].shape == (), key

    # The plain spec functions on full logits give the same numbers.
    rows = (labels != -100) if restrict else am.astype(bool)
    np.testing.assert_allclose(float(ce_loss(s_logits, t_logits, rows, cfg.temperature)),
                               expected["loss_ce"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(mlm_loss(s_logits, labels)), expected["loss_mlm"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(cos_loss(sh, th, am)), expected["loss_cos"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(mse_loss(s_logits, t_logits, rows)), expected["loss_mse"],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_counts_and_aggregation_over_micro_batches():
    sh, th, am, labels = _batch(n_masked=8)
    ws, wt, bs = _linear_heads()
    cfg = LossConfig(chunk_rows=7)
    counts = loss_counts(labels, am, cfg)
    assert float(counts["cos_rows"]) == sum(LENGTHS) == float(counts["ce_rows"])
    assert float(counts["mlm_rows"]) == 8
    assert float(loss_counts(labels, am, LossConfig(restrict_ce_to_mask=True))["ce_rows"]) == 8

    @jax.jit
    def sums_fn(sh, th, labels, am):
        return loss_sums(sh, th, lambda h: h @ ws + bs, lambda h: h @ wt, labels, am, cfg)

    def sums_of(sl):
        return sums_fn(sh[sl], th[sl], labels[sl], am[sl])

    whole = sums_of(slice(None))
    parts = [sums_of(slice(0, 1)), sums_of(slice(1, 3))]
    for key in whole:  # sums and counts add up exactly over micro-batches
        np.testing.assert_allclose(float(whole[key]), sum(float(p[key]) for p in parts), rtol=1e-5, err_msg=key)


def test_empty_counts_give_zero_not_nan():
    zero = jnp.zeros((), jnp.float32)
    sums = {k: zero for k in ("ce_sum", "mlm_sum", "cos_sum", "mse_sum", "mlm_correct")}
    counts = {k: zero for k in ("ce_rows", "mlm_rows", "cos_rows")}
    total, metrics = combine_losses(sums, counts, LossConfig())
    assert float(total) == 0.0 and all(np.isfinite(float(v)) for v in metrics.values())


# --------------------------------------------------------------------------------------------------
# Memory-efficient paths == plain computation, values and gradients, with the real MLM head.
# --------------------------------------------------------------------------------------------------


@functools.cache
def _tiny_models():
    """A tiny DistilBERT (its MLM head is what the losses call) and student/teacher parameters."""
    cfg = DistilBertConfig(vocab_size=V, dim=D, n_heads=2, hidden_dim=32, n_layers=1,
                           max_position_embeddings=32)
    model = build_model(cfg)
    # jit: one compiled init instead of seconds of op-by-op dispatch.
    params = jax.jit(lambda key: init_params(model, key))(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(1), 2 * len(leaves))
    # Random values everywhere (also biases / LayerNorm), larger than BERT's 0.02, so that logits
    # and gradients are far from uniform and every head parameter matters.
    student = [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys[: len(leaves)])]
    teacher = [x + 0.5 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys[len(leaves):])]
    return model, jax.tree.unflatten(tree, student), jax.tree.unflatten(tree, teacher)


CASES = {
    # name: (LossConfig kwargs, max_rows, with teacher, sequence length used of T)
    "chunked_all_rows": (dict(chunk_rows=5, alpha_mse=0.2), None, True, T),
    # 3 x 11 = 33 rows, chunks of <= 10: no divisor fits, so 4 chunks of 9 with 3 padding rows.
    "chunked_padded": (dict(chunk_rows=10), None, True, 11),
    "restrict_gathered": (dict(chunk_rows=5, restrict_ce_to_mask=True, alpha_mse=0.2), 9, True, T),
    "restrict_gathered_unchunked": (dict(chunk_rows=None, restrict_ce_to_mask=True), 9, True, T),
    "restrict_overflow_fallback": (dict(chunk_rows=8, restrict_ce_to_mask=True), 4, True, T),
    "restrict_no_bound_chunked": (dict(chunk_rows=6, restrict_ce_to_mask=True), None, True, T),
    "mlm_only_gathered": (dict(chunk_rows=4, alpha_ce=0.0, alpha_cos=0.0), 9, False, T),
    "mlm_only_chunked": (dict(chunk_rows=4, alpha_ce=0.0, alpha_cos=0.0), None, False, T),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_efficient_equals_plain_values_and_grads(case):
    kwargs, max_rows, with_teacher, length = CASES[case]
    cfg = LossConfig(**kwargs)
    sh, th, am, labels = (x[:, :length] for x in _batch(seed=3, n_masked=7))
    assert 0 < int((labels != -100).sum()) <= 7
    model, sp, tp = _tiny_models()
    student = teacher = model
    t_head = (lambda h: teacher.apply({"params": tp}, h, method="mlm_logits")) if with_teacher else None
    th_in = th if with_teacher else None
    counts = loss_counts(labels, am, cfg)

    def objective(fn, extra):
        def f(params, hidden):
            s_head = lambda h: student.apply({"params": params}, h, method="mlm_logits")  # noqa: E731
            sums = fn(hidden, th_in, s_head, t_head, labels, am, cfg, **extra)
            return combine_losses(sums, counts, cfg)[0], sums
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))

    (v_eff, sums_eff), (gp_eff, gh_eff) = objective(loss_sums, {"max_rows": max_rows})(sp, sh)
    (v_ref, sums_ref), (gp_ref, gh_ref) = objective(plain_loss_sums, {})(sp, sh)

    np.testing.assert_allclose(float(v_eff), float(v_ref), rtol=1e-5, atol=1e-5)
    for key in sums_ref:
        np.testing.assert_allclose(float(sums_eff[key]), float(sums_ref[key]), rtol=1e-5, atol=1e-5,
                                   err_msg=key)
    if not with_teacher:
        assert all(float(sums_eff[k]) == 0.0 for k in ("ce_sum", "cos_sum", "mse_sum"))
    np.testing.assert_allclose(np.asarray(gh_eff), np.asarray(gh_ref), rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(gh_ref).max()) > 1e-3  # the comparison is not vacuous
    flat_eff = jax.tree_util.tree_leaves_with_path(gp_eff)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(gp_ref))
    head_grads = 0
    for path, g in flat_eff:
        np.testing.assert_allclose(np.asarray(g), np.asarray(flat_ref[path]), rtol=1e-5, atol=1e-5,
                                   err_msg=jax.tree_util.keystr(path))
        if "mlm_head" in jax.tree_util.keystr(path) or "word_embeddings" in jax.tree_util.keystr(path):
            head_grads += float(jnp.abs(flat_ref[path]).max()) > 1e-4
    assert head_grads >= 4  # transform kernel/bias, norm, bias, tied embeddings get real gradients


def test_mlm_only_matches_torch_cross_entropy():
    torch = pytest.importorskip("torch")
    sh, _, am, labels = _batch(seed=5, n_masked=6)
    ws, _, bs = _linear_heads()
    cfg = LossConfig(alpha_ce=0.0, alpha_cos=0.0, chunk_rows=4)
    sums = loss_sums(sh, None, lambda h: h @ ws + bs, None, labels, am, cfg, max_rows=8)
    total, metrics = combine_losses(sums, loss_counts(labels, am, cfg), cfg)
    logits = torch.from_numpy((sh @ ws + bs).reshape(-1, V))
    ref = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels.reshape(-1).astype(np.int64)),
                                            ignore_index=-100)
    np.testing.assert_allclose(float(metrics["loss_mlm"]), float(ref), rtol=1e-5)
    np.testing.assert_allclose(float(total), cfg.alpha_mlm * float(ref), rtol=1e-5)
    assert float(metrics["loss_ce"]) == float(metrics["loss_cos"]) == float(metrics["loss_mse"]) == 0.0


def test_low_precision_logits_are_upcast():
    """bf16 heads: the sums are float32 and equal the float32 computation on the same logits."""
    sh, th, am, labels = _batch(seed=2)
    ws, wt, bs = _linear_heads()
    cfg = LossConfig(alpha_mse=1.0, chunk_rows=8)
    s_head = lambda h: (h @ ws + bs).astype(jnp.bfloat16)  # noqa: E731
    t_head = lambda h: (h @ wt).astype(jnp.bfloat16)  # noqa: E731
    got = loss_sums(sh, th, s_head, t_head, labels, am, cfg)
    ref = plain_loss_sums(sh, th, lambda h: s_head(h).astype(jnp.float32),
                          lambda h: t_head(h).astype(jnp.float32), labels, am, cfg)
    for key in ref:
        assert got[key].dtype == jnp.float32
        np.testing.assert_allclose(float(got[key]), float(ref[key]), rtol=1e-5, atol=1e-5, err_msg=key)


# --------------------------------------------------------------------------------------------------
# Finite-difference gradient check (float64) through the chunked and gathered paths.
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("restrict", [False, True])
def test_check_grads_float64(restrict):
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        sh, th, am, labels = _batch(seed=7, n_masked=5)
        ws, wt, bs = _linear_heads()
        sh, th, ws, wt, bs = (np.asarray(x, np.float64) for x in (sh, th, ws, wt, bs))
        cfg = LossConfig(alpha_mse=0.1, restrict_ce_to_mask=restrict, chunk_rows=7)
        counts = loss_counts(labels, am, cfg)

        @jax.jit
        def f(ws, bs, hidden):
            sums = loss_sums(hidden, th, lambda h: jnp.tanh(h @ ws) + bs, lambda h: h @ wt, labels, am,
                             cfg, max_rows=6)
            return combine_losses(sums, counts, cfg)[0]

        assert f(ws, bs, sh).dtype == jnp.float64
        check_grads(f, (ws, bs, sh), order=1, modes=["rev"], eps=1e-4, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------------------------------
# Compiled memory: chunking shrinks the temporary buffers of loss + gradient at a vocab-heavy shape.
# --------------------------------------------------------------------------------------------------


def _temp_bytes(fn, cfg, rows, vocab, hidden, **extra) -> int:
    def loss(ws, hid, th, wt, labels, am):
        sums = fn(hid, th, lambda h: h @ ws, lambda h: h @ wt, labels, am, cfg, **extra)
        return combine_losses(sums, sums, cfg)[0]

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    h = jax.ShapeDtypeStruct((rows // 128, 128, hidden), jnp.float32)
    w = jax.ShapeDtypeStruct((hidden, vocab), jnp.float32)
    i = jax.ShapeDtypeStruct((rows // 128, 128), jnp.int32)
    return f.lower(w, h, h, w, i, i).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_compiled_temp_memory_chunked_vs_plain():
    rows, vocab, hidden = 1024, 30522, 8
    logits_mib = rows * vocab * 4 / 2**20
    plain = _temp_bytes(plain_loss_sums, LossConfig(), rows, vocab, hidden)
    chunked = _temp_bytes(loss_sums, LossConfig(chunk_rows=128), rows, vocab, hidden)
    bound = max_masked_rows(rows // 128, 128, 0.15)
    gathered = _temp_bytes(loss_sums, LossConfig(restrict_ce_to_mask=True, chunk_rows=None), rows, vocab,
                           hidden, max_rows=bound)
    print(f"\nloss+grad temp memory at {rows} rows x vocab {vocab} (one fp32 [rows, V] = {logits_mib:.0f} MiB):"
          f" plain {plain / 2**20:.1f} MiB, chunked(128 rows) {chunked / 2**20:.1f} MiB,"
          f" restrict_ce_to_mask gathered ({bound} rows) {gathered / 2**20:.1f} MiB")
    assert plain > 3 * rows * vocab * 4  # the plain program really holds several [rows, V] buffers
    assert chunked * 5 < plain
    assert gathered * 3 < plain


def test_config_validation():
    with pytest.raises(UserError, match="temperature"):
        LossConfig(temperature=0.0)
    with pytest.raises(UserError, match="chunk_rows"):
        LossConfig(chunk_rows=0)
    with pytest.raises(UserError, match="alpha_ce"):
        LossConfig(alpha_ce=-1.0)
    sh, th, am, labels = _batch()
    with pytest.raises(UserError, match="neither"):
        loss_sums(sh, th, lambda h: h, None, labels, am, LossConfig())
    assert max_masked_rows(8, 128, 0.15) >= math.ceil(0.15 * 8 * 128)


def test_max_masked_rows():
    assert max_masked_rows(8, 128, 0.15) == math.ceil(0.15 * 8 * 128) + 1
    assert max_masked_rows(1, 4, 0.9) == 4  # never more than the rows
    # A micro-batch of a larger masked batch gets a margin, proportionally smaller as it grows.
    small, big = max_masked_rows(8, 128, 0.15, masked_batch=32), max_masked_rows(256, 128, 0.15, masked_batch=1024)
    assert 0.15 * 8 * 128 * 1.2 < small < 0.15 * 8 * 128 * 1.5
    assert 0.15 * 256 * 128 < big < 0.15 * 256 * 128 * 1.1


@pytest.mark.slow
def test_gathered_rows_are_sharded_over_the_batch_axis():
    """With a data-parallel mesh and an "activation_batch" rule, each device runs the heads on its
    share of the gathered rows (not all of them), and the numbers equal the single-device ones."""
    import flax.linen as nn
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    devices = np.array(jax.devices()[:8])
    if devices.size < 8:
        pytest.skip("needs 8 devices (tests/conftest.py sets them up on CPU)")
    mesh = Mesh(devices, ("data",))
    b, t, vocab, k = 8, 16, 64, 24
    rng = np.random.default_rng(0)
    ws = rng.normal(size=(D, vocab)).astype(np.float32)
    wt = rng.normal(size=(D, vocab)).astype(np.float32)
    sh = rng.normal(size=(b, t, D)).astype(np.float32)
    th = rng.normal(size=(b, t, D)).astype(np.float32)
    labels = np.full(b * t, -100, np.int32)
    labels[rng.choice(b * t, size=k - 3, replace=False)] = rng.integers(0, vocab, size=k - 3)
    labels = labels.reshape(b, t)
    am = np.ones((b, t), np.int32)
    cfg = LossConfig(restrict_ce_to_mask=True, chunk_rows=None)

    def loss(ws, hidden, rules):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            sums = loss_sums(hidden, th, lambda h: h @ ws, lambda h: h @ wt, labels, am, cfg, max_rows=k)
        return combine_losses(sums, loss_counts(labels, am, cfg), cfg)[0]

    rows = NamedSharding(mesh, P("data"))
    rules = (("activation_batch", "data"), ("activation_embed", None))
    sharded = jax.jit(jax.value_and_grad(lambda w, h: loss(w, h, rules), argnums=(0, 1)),
                      in_shardings=(NamedSharding(mesh, P()), rows))
    hlo = sharded.lower(ws, sh).compile().as_text()
    # The student head's matmul on each shard's own gathered rows: [rows, vocab] per device, rows
    # the per-shard bound (not all k rows, nor all b * t).
    rows_per_shard = shard_rows_bound(k, b * t, 8)
    assert rows_per_shard < k
    assert re.search(rf"f32\[(1,)?{rows_per_shard},{vocab}\]", hlo)
    assert f"f32[{k},{vocab}]" not in hlo and f"{b * t},{vocab}]" not in hlo
    v_sh, g_sh = sharded(ws, sh)
    v_1, g_1 = jax.jit(jax.value_and_grad(lambda w, h: loss(w, h, ()), argnums=(0, 1)))(ws, sh)
    np.testing.assert_allclose(float(v_sh), float(v_1), rtol=1e-6)
    for a, b_ in zip(g_sh, g_1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 8.0])
def test_chunked_gradient_equals_torch_at_temperatures(temperature):
    """The chunked loss's hand-written backward pass against torch autograd of the reference's
    losses (kl_div batchmean x T^2, cross_entropy, cosine_embedding_loss), at several temperatures:
    gradients with respect to the student's hidden states and its head's weights."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    cfg = LossConfig(temperature=temperature, alpha_ce=5.0, alpha_mlm=2.0, alpha_cos=1.0, chunk_rows=5)
    sh, th, am, labels = _batch(seed=11, n_masked=8)
    ws, wt, bs = _linear_heads(seed=4)
    counts = loss_counts(labels, am, cfg)

    def ours(hidden, w):
        sums = loss_sums(hidden, th, lambda h: h @ w + bs, lambda h: h @ wt, labels, am, cfg)
        return combine_losses(sums, counts, cfg)[0]

    value, (g_hidden, g_w) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(sh, ws)

    hidden = torch.from_numpy(sh).requires_grad_()
    w = torch.from_numpy(ws).requires_grad_()
    s = hidden @ w + torch.from_numpy(bs)
    t = torch.from_numpy(th) @ torch.from_numpy(wt)
    rows = torch.from_numpy(am).bool()
    lab = torch.from_numpy(labels.astype(np.int64))
    l_ce = F.kl_div(F.log_softmax(s[rows] / temperature, -1), F.softmax(t[rows] / temperature, -1),
                    reduction="batchmean") * temperature**2
    l_mlm = F.cross_entropy(s.view(-1, V), lab.view(-1), ignore_index=-100)
    l_cos = F.cosine_embedding_loss(hidden[rows], torch.from_numpy(th)[rows], torch.ones(int(rows.sum())))
    total = 5.0 * l_ce + 2.0 * l_mlm + 1.0 * l_cos
    total.backward()
    assert abs(float(value) - float(total)) <= 1e-5 * max(1.0, abs(float(total)))
    np.testing.assert_allclose(np.asarray(g_hidden), hidden.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_w), w.grad.numpy(), rtol=1e-4, atol=1e-5)
    assert float(np.abs(w.grad.numpy()).max()) > 1e-3


def _torch_soft_targets(name, s, ts, mixture, temperature, beta):
    """A soft target from the formula with torch.nn.functional, per row [n]: s [n, V], ts teachers'
    logits; P = sum_k mixture_k softmax(t_k / T), Q = softmax(s / T)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    if name == "logits_mse":
        return ((s - ts[0]) ** 2).sum(-1)
    p = sum(w * F.softmax(t / temperature, -1) for t, w in zip(ts, mixture))
    log_q = F.log_softmax(s / temperature, -1)
    if name == "kl":
        per_row = F.kl_div(log_q, p, reduction="none").sum(-1)
    elif name == "reverse_kl":
        per_row = F.kl_div(p.log(), log_q.exp(), reduction="none").sum(-1)
    else:
        q = log_q.exp()
        m = beta * p + (1 - beta) * q
        per_row = (beta * F.kl_div(m.log(), p, reduction="none").sum(-1)
                   + (1 - beta) * F.kl_div(m.log(), q, reduction="none").sum(-1))
    return per_row * temperature**2


@pytest.mark.parametrize("path", ["plain", "chunked", "gathered"])
def test_soft_targets_with_teacher_mixtures_equal_torch(path):
    """The engine's soft targets (``loss_sums(..., soft=...)``: reverse KL, JSD, logits MSE and a KL
    from a mixture of two teachers, on all rows or the masked ones) against torch autograd of their
    formulas: every mean and the gradient of their weighted total with respect to the student's
    hidden states and head, on one block, in chunks, and on gathered masked rows."""
    torch = pytest.importorskip("torch")
    from jaxdistil.distill.losses import SoftTarget

    masked_only = path == "gathered"
    rows = "masked" if masked_only else "all"
    soft = (SoftTarget("reverse_kl", temperature=1.5, rows=rows),
            SoftTarget("jsd", (1,), temperature=2.5, beta=0.3, rows=rows),
            SoftTarget("logits_mse", (1,), rows="masked"),
            SoftTarget("kl", (0, 1), (0.25, 0.75), temperature=2.0, rows=rows))
    weights = (0.7, 1.3, 0.01, 2.0)
    cfg = LossConfig(alpha_ce=0.0, alpha_mlm=1.0, alpha_cos=0.0, chunk_rows={"plain": None}.get(path, 5),
                     restrict_ce_to_mask=masked_only)
    sh, th, am, labels = _batch(seed=3, n_masked=8)
    th2 = (0.3 * th + np.random.default_rng(5).normal(size=th.shape)).astype(np.float32)
    ws, wt, bs = _linear_heads(seed=6)
    wt2 = _linear_heads(seed=7)[1]
    counts = loss_counts(labels, am, cfg)
    max_rows = 9 if masked_only else None

    def ours(hidden, w):
        sums = loss_sums(hidden, (th, th2), lambda h: h @ w + bs, (lambda h: h @ wt, lambda h: h @ wt2), labels, am,
                         cfg, max_rows=max_rows, soft=soft)
        means = [sums[f"soft{i}_sum"] / counts["mlm_rows" if s.rows == "masked" else "cos_rows"]
                 for i, s in enumerate(soft)]
        return sum(c * m for c, m in zip(weights, means)), means

    (value, means), (g_hidden, g_w) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1), has_aux=True))(sh, ws)

    hidden = torch.from_numpy(sh).double().requires_grad_()
    w = torch.from_numpy(ws).double().requires_grad_()
    s = hidden @ w + torch.from_numpy(bs).double()
    ts = (torch.from_numpy(th).double() @ torch.from_numpy(wt).double(),
          torch.from_numpy(th2).double() @ torch.from_numpy(wt2).double())
    sel = {"all": torch.from_numpy(am).bool(), "masked": torch.from_numpy(labels != -100)}
    ref_means = []
    for spec in soft:
        m = sel[spec.rows]
        per_row = _torch_soft_targets(spec.kind, s[m], [ts[i][m] for i in spec.teachers], spec.mixture,
                                      spec.temperature, spec.beta)
        ref_means.append(per_row.mean())
    ref = sum(c * m for c, m in zip(weights, ref_means))
    ref.backward()
    for got, want in zip(means, ref_means):
        np.testing.assert_allclose(float(got), want.item(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(value), ref.item(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g_hidden), hidden.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_w), w.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_soft_targets_leave_the_section_alone():
    """Soft targets added to a loss section with alpha_ce > 0: the section's sums are the ones
    without them (the same blocks of logits serve both), and with alpha_ce = 0 the section's KL
    is not computed (ce_sum 0)."""
    from jaxdistil.distill.losses import SoftTarget

    sh, th, am, labels = _batch(seed=2)
    ws, wt, bs = _linear_heads(seed=2)
    heads = (lambda h: h @ ws + bs, lambda h: h @ wt)
    cfg = LossConfig(alpha_mse=1.0, chunk_rows=7)
    alone = loss_sums(sh, th, *heads, labels, am, cfg)
    both = loss_sums(sh, th, *heads, labels, am, cfg, soft=(SoftTarget("kl", temperature=cfg.temperature),))
    for key in ("ce_sum", "mlm_sum", "cos_sum", "mse_sum", "mlm_correct"):
        np.testing.assert_allclose(float(both[key]), float(alone[key]), rtol=1e-6)
    np.testing.assert_allclose(float(both["soft0_sum"]), float(alone["ce_sum"]), rtol=1e-6)  # the same KL
    off = loss_sums(sh, th, *heads, labels, am, LossConfig(alpha_ce=0.0),
                    soft=(SoftTarget("jsd"),))
    assert float(off["ce_sum"]) == 0.0 and float(off["soft0_sum"]) > 0
