"""Tests of jaxdistil.distill.terms: every term against an independent PyTorch implementation of its
paper's formula, in the loss and in the gradient with respect to the student's inputs (float64, and
float32 for a few), on odd sizes with padded, packed (two segments in a row) and causal rows, a
student narrower than its teacher with other head counts; one-line UserErrors for bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.distill import terms
from jaxdistil.distill.terms import TERMS, init_projection, resolve_options, term_sums
from jaxdistil.errors import UserError
from jaxdistil.models.layers import attention_mask_from

torch = pytest.importorskip("torch")
F = torch.nn.functional

B, T, V = 3, 7, 11  # batch, length, vocab
L_S, L_T = 3, 4  # student / teacher layers
D_S, D_T = 10, 14  # hidden widths (student narrower)
# Loss and gradients: float64 agrees to rounding (seen: 2e-13), float32 within 1e-5 (seen: 1e-6).
TOL = {jnp.float64: 1e-9, jnp.float32: 1e-5}
LAYOUTS = ("padded", "packed", "causal")
# Packed rows: two segments in rows 0 and 1 (row 1 padded after them), one padded segment in row 2.
SEGMENTS = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 0]])
LENGTHS = (7, 5, 3)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _layout(kind: str):
    """(real tokens [B, T] bool, key mask [B, T, S] bool for torch, the mask the term gets, segment ids)."""
    if kind == "packed":
        real = SEGMENTS > 0
        keys = (SEGMENTS[:, :, None] == SEGMENTS[:, None, :]) & real[:, None, :]  # block-diagonal
        return real, keys, keys, SEGMENTS  # the term gets [B, T, S]
    real = np.arange(T)[None, :] < np.array(LENGTHS)[:, None]
    keys = np.broadcast_to(real[:, None, :], (B, T, T)).copy()
    if kind == "causal":
        keys = keys & np.tril(np.ones((T, T), bool))[None]
        return real, keys, keys[:, None], None  # [B, 1, T, S]
    # padding only: the model's own [B, 1, 1, S] mask, broadcast by the term
    return real, keys, attention_mask_from(jnp.asarray(real.astype(np.int32)), None, (B, T)), None


def _masked_softmax(x: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Attention probabilities [..., B, N, T, S] with 0 on hidden keys (and on fully hidden rows)."""
    vis = keys[:, None]
    top = np.where(vis, x, -np.inf).max(-1, keepdims=True)
    e = np.where(vis, np.exp(x - np.where(np.isfinite(top), top, 0.0)), 0.0)
    return e / np.maximum(e.sum(-1, keepdims=True), 1e-300)


def _compare(jax_loss, torch_loss, inputs: list[np.ndarray], dtype) -> None:
    """jax_loss(*inputs) -> {"sum", "count"}; torch_loss(*tensors) -> the loss; both the value and the
    gradient with respect to every input within TOL[dtype] (the torch side in float64 from the same
    values)."""

    def loss(*xs):
        out = jax_loss(*xs)
        assert out["sum"].dtype == dtype and out["count"].dtype == dtype
        return out["sum"] / out["count"]

    xs = [jnp.asarray(x.astype(dtype)) for x in inputs]
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(xs)))))(*xs)
    ts = [torch.tensor(x.astype(dtype).astype(np.float64), requires_grad=True) for x in inputs]
    ref = torch_loss(*ts)
    ref.backward()
    assert value.dtype == dtype
    tol = TOL[dtype]
    np.testing.assert_allclose(float(value), ref.item(), rtol=tol, atol=tol)
    for i, (g, t) in enumerate(zip(grads, ts)):
        np.testing.assert_allclose(np.asarray(g, np.float64), t.grad.numpy(), rtol=tol, atol=tol,
                                   err_msg=f"gradient of input {i}")


def _rows_tensor(real):
    return torch.from_numpy(real)


# --------------------------------------------------------------------------------------------------
# The torch side: each paper's formula, written with torch.nn.functional.
# --------------------------------------------------------------------------------------------------


def _torch_soft(name, s, t, sel, temperature, beta):
    s, t = s[sel] / temperature, t[sel] / temperature  # [n, V]
    if name == "kl":
        return F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean") * temperature**2
    if name == "reverse_kl":
        return F.kl_div(F.log_softmax(t, -1), F.softmax(s, -1), reduction="batchmean") * temperature**2
    if name == "jsd":
        p, q = F.softmax(t, -1), F.softmax(s, -1)
        m = beta * p + (1 - beta) * q
        return (beta * F.kl_div(m.log(), p, reduction="batchmean")
                + (1 - beta) * F.kl_div(m.log(), q, reduction="batchmean")) * temperature**2
    assert name == "logits_mse"  # no temperature (temperature = 1 here)
    return F.mse_loss(s, t, reduction="sum") / s.shape[0]


def _torch_rel_kl(s_scores, t_scores, keys, sel):
    """Mean over selected query rows and heads of KL(softmax(t) || softmax(s)) over visible keys;
    scores [B, G, T, S]."""
    vis = torch.from_numpy(keys)[:, None]
    lo = torch.finfo(torch.float64).min
    log_s = F.log_softmax(s_scores.masked_fill(~vis, lo), -1)
    log_t = F.log_softmax(t_scores.masked_fill(~vis, lo), -1)
    kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)  # [B, G, T]
    kl = kl.permute(0, 2, 1)[sel]  # [n, G]
    return kl.sum() / kl.numel()


def _torch_relation(x, groups):
    """x [B, T, D] -> x_g x_g^T / sqrt(D / groups) [B, G, T, T]."""
    b, t, d = x.shape
    xg = x.reshape(b, t, groups, d // groups).permute(0, 2, 1, 3)
    return xg @ xg.transpose(-1, -2) / math.sqrt(d // groups)


# --------------------------------------------------------------------------------------------------
# Parity with torch.
# --------------------------------------------------------------------------------------------------


SOFT = ("kl", "reverse_kl", "jsd", "logits_mse")


def _soft_case(name, layout, rng, weighted=False):
    real, _, _, _ = _layout(layout)
    s = 3.0 * rng.normal(size=(B, T, V))
    t = 3.0 * rng.normal(size=(B, T, V))
    s[0, 0, 3] = 40.0  # a peaked row: some probabilities far below float32's resolution
    options = {} if name == "logits_mse" else {"temperature": 1.7}
    if name == "jsd":
        options["beta"] = 0.3
    rows = real.astype(np.float32)
    if weighted:  # rows may carry weights other than 0 / 1
        rows = rows * rng.uniform(0.5, 2.0, size=(B, T)).astype(np.float32)
    flat = layout == "packed"  # [N, V] logits with [N] rows
    shape = (B * T, V) if flat else (B, T, V)
    rows_in = rows.reshape(-1) if flat else rows

    def jax_loss(s_logits):
        return term_sums(name, {"logits": s_logits.reshape(shape)}, {"logits": jnp.asarray(t).reshape(shape)},
                         jnp.asarray(rows_in), options=options)

    def torch_loss(s_logits):
        temp = options.get("temperature", 1.0)
        if weighted:  # (kl only) the weighted mean of the per-row KL
            assert name == "kl"
            per_row = F.kl_div(F.log_softmax(s_logits / temp, -1), F.softmax(torch.from_numpy(t) / temp, -1),
                               reduction="none").sum(-1) * temp**2
            w = torch.from_numpy(rows.astype(np.float64))
            return (per_row * w).sum() / w.sum()
        return _torch_soft(name, s_logits, torch.from_numpy(t), _rows_tensor(real), temp, options.get("beta"))

    return jax_loss, torch_loss, [s]


def _hard_case(name, layout, rng):
    real, _, _, seg = _layout(layout)
    s = 2.0 * rng.normal(size=(B, T, V))
    ids = rng.integers(0, V, size=(B, T))
    if name == "mlm_ce":
        labels = np.where(real & (rng.uniform(size=(B, T)) < 0.5), ids, -100)
        labels[0, 1] = ids[0, 1]  # at least one label

        def jax_loss(s_logits):
            return term_sums(name, {"logits": s_logits}, None, jnp.asarray(real, jnp.float32),
                             labels=jnp.asarray(labels))

        def torch_loss(s_logits):
            return F.cross_entropy(s_logits.reshape(-1, V), torch.from_numpy(labels).reshape(-1), ignore_index=-100)
    else:
        labels = np.where(real, ids, -100)  # unshifted: the input ids, -100 at padding

        def jax_loss(s_logits):
            return term_sums(name, {"logits": s_logits}, None, jnp.asarray(real, jnp.float32),
                             labels=jnp.asarray(labels), segment_ids=None if seg is None else jnp.asarray(seg))

        def torch_loss(s_logits):
            lm = torch.from_numpy(labels).clone()
            if seg is not None:  # a segment's first token is no target of the previous segment's last
                segs = torch.from_numpy(seg)
                lm[:, 1:][segs[:, 1:] != segs[:, :-1]] = -100
            return F.cross_entropy(s_logits[:, :-1].reshape(-1, V), lm[:, 1:].reshape(-1), ignore_index=-100)

    return jax_loss, torch_loss, [s]


def _hidden_case(name, layout, rng):
    real, _, _, _ = _layout(layout)
    narrow = layout != "packed"  # packed: equal widths, no projection
    d_s = D_S if narrow else D_T
    hs = rng.normal(size=(L_S + 1, B, T, d_s))
    ht = rng.normal(size=(L_T + 1, B, T, D_T))
    layers = [[0, 0], [2, 3], [-1, -1]]
    reduce = "mean" if layout == "causal" else "sum"
    options = {"layers": layers, "layer_reduce": reduce}
    proj = init_projection(jax.random.key(0), d_s, D_T, std=0.3)
    kernel = np.asarray(proj["kernel"], np.float64)
    bias = rng.normal(size=(D_T,))
    sel = _rows_tensor(real)

    def jax_loss(h, *p):
        projection = {"kernel": p[0], "bias": p[1]} if p else None
        return term_sums(name, {"hidden_states": h}, {"hidden_states": jnp.asarray(ht)}, jnp.asarray(real, jnp.float32),
                         options=options, projection=projection)

    def torch_loss(h, *p):
        total = 0.0
        for i, j in layers:
            s = h[i] @ p[0] + p[1] if p else h[i]
            s, t = s[sel], torch.from_numpy(ht[j])[sel]  # [n, D_t]
            if name == "hidden_cos":
                total = total + F.cosine_embedding_loss(s, t, torch.ones(s.shape[0], dtype=s.dtype))
            else:
                total = total + F.mse_loss(s, t)  # mean over rows x teacher width
        return total / len(layers) if reduce == "mean" else total

    return jax_loss, torch_loss, [hs, kernel, bias] if narrow else [hs]


def _attention_case(name, layout, rng):
    real, keys, mask, _ = _layout(layout)
    n = 2
    layers = [[0, 1], [-1, -1]] if layout == "padded" else [[1, 3]]
    reduce = "mean" if layout == "causal" else "sum"
    options = {"layers": layers, "layer_reduce": reduce}
    sel = _rows_tensor(real)
    vis = torch.from_numpy(keys)[:, None]  # [B, 1, T, S]
    if name in ("attention_kl", "attention_mse"):
        s_scores = 2.0 * rng.normal(size=(L_S, B, n, T, T))
        t_scores = 2.0 * rng.normal(size=(L_T, B, n, T, T))
        if name == "attention_kl":
            s_in, t_in, key = _masked_softmax(s_scores, keys), _masked_softmax(t_scores, keys), "attention_probs"
        else:  # hidden keys at float32's most negative value, as attention.scores gives them
            lo = np.finfo(np.float32).min
            s_in, t_in = (np.where(keys[:, None], x, lo) for x in (s_scores, t_scores))
            key = "attention_scores"
        if layout == "packed":  # junk on the hidden keys: the mask alone must keep them out
            s_in, t_in = (np.where(keys[:, None], x, 0.25 + 0.5 * rng.uniform(size=x.shape)) for x in (s_in, t_in))

        def jax_loss(x):
            return term_sums(name, {key: x}, {key: jnp.asarray(t_in)}, jnp.asarray(real, jnp.float32),
                             options=options, mask=mask)

        def torch_loss(x):
            total = 0.0
            for i, j in layers:
                p_s, p_t = x[i], torch.from_numpy(t_in[j])  # [B, N, T, S]
                if name == "attention_kl":
                    log_s = torch.log(p_s.masked_fill(~vis, 1.0))
                    kl = F.kl_div(log_s, p_t.masked_fill(~vis, 0.0), reduction="none").sum(-1).permute(0, 2, 1)[sel]  # [n, N]
                    total = total + kl.sum() / kl.numel()
                else:
                    entries = (vis & sel[:, None, :, None]).expand_as(p_s)
                    total = total + F.mse_loss(p_s[entries], p_t[entries])
            return total / len(layers) if reduce == "mean" else total

        return jax_loss, torch_loss, [s_in]

    # value_relation_kl: equal head counts, head widths 5 (student) and 7 (teacher)
    vs = rng.normal(size=(L_S, B, T, n, D_S // n))
    vt = rng.normal(size=(L_T, B, T, n, D_T // n))

    def jax_loss(x):
        return term_sums(name, {"values": x}, {"values": jnp.asarray(vt)}, jnp.asarray(real, jnp.float32),
                         options=options, mask=mask)

    def torch_loss(x):
        total = 0.0
        for i, j in layers:
            total = total + _torch_rel_kl(_torch_relation(x[i].reshape(B, T, -1), n),
                                          _torch_relation(torch.from_numpy(vt[j]).reshape(B, T, -1), n), keys, sel)
        return total / len(layers) if reduce == "mean" else total

    return jax_loss, torch_loss, [vs]


def _minilmv2_case(layout, rng):
    """Student 2 heads of 5 (D = 10), teacher 5 heads of 3 (D = 15), 5 relation heads."""
    real, keys, mask, _ = _layout(layout)
    r = 5
    weights = (1.0, 0.5, 2.0)
    layers = [[1, 2], [-1, -1]] if layout == "packed" else [[-1, 3]]
    reduce = "mean" if layout == "packed" else "sum"
    options = {"relation_heads": r, "relation_weights": weights, "layers": layers, "layer_reduce": reduce}
    sq, sk, sv = (rng.normal(size=(L_S, B, T, 2, 5)) for _ in range(3))
    tq, tk, tv = (rng.normal(size=(L_T, B, T, 5, 3)) for _ in range(3))
    sel = _rows_tensor(real)

    def jax_loss(q, k, v):
        teacher = {"queries": jnp.asarray(tq), "keys": jnp.asarray(tk), "values": jnp.asarray(tv)}
        return term_sums("minilmv2_relations", {"queries": q, "keys": k, "values": v}, teacher,
                         jnp.asarray(real, jnp.float32), options=options, mask=mask)

    def torch_loss(q, k, v):
        total = 0.0
        for i, j in layers:
            for w, xs, xt in zip(weights, (q, k, v), (tq, tk, tv)):
                rel_s = _torch_relation(xs[i].reshape(B, T, -1), r)
                rel_t = _torch_relation(torch.from_numpy(xt[j]).reshape(B, T, -1), r)
                total = total + w * _torch_rel_kl(rel_s, rel_t, keys, sel)
        return total / len(layers) if reduce == "mean" else total

    return jax_loss, torch_loss, [sq, sk, sv]


def _case(name, layout, seed=0):
    rng = np.random.default_rng(seed)
    if name in SOFT:
        return _soft_case(name, layout, rng)
    if name in ("mlm_ce", "clm_ce"):
        return _hard_case(name, layout, rng)
    if name in ("hidden_cos", "hidden_mse"):
        return _hidden_case(name, layout, rng)
    if name == "minilmv2_relations":
        return _minilmv2_case(layout, rng)
    return _attention_case(name, layout, rng)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(TERMS))
def test_parity_with_torch_float64(x64, name, layout):
    _compare(*_case(name, layout), dtype=jnp.float64)


@pytest.mark.parametrize("name", ["kl", "jsd", "hidden_mse", "attention_kl", "minilmv2_relations"])
def test_parity_with_torch_float32(name):
    """float32 inputs give float32 sums, within 1e-5 of torch's float64 on the same values."""
    _compare(*_case(name, "packed", seed=1), dtype=jnp.float32)


def test_weighted_rows(x64):
    """Row weights other than 0 / 1: a weighted mean (clm_ce: the weight of the scored position t)."""
    rng = np.random.default_rng(2)
    _compare(*_soft_case("kl", "padded", rng, weighted=True), dtype=jnp.float64)
    real, _, _, _ = _layout("padded")
    w = real * rng.uniform(0.5, 2.0, size=(B, T))
    labels = np.where(real, rng.integers(0, V, size=(B, T)), -100)

    def jax_loss(s_logits):
        return terms.clm_ce(s_logits, jnp.asarray(labels), jnp.asarray(w))

    def torch_loss(s_logits):
        ce = F.cross_entropy(s_logits[:, :-1].reshape(-1, V), torch.from_numpy(labels[:, 1:]).reshape(-1),
                             ignore_index=-100, reduction="none")
        weight = torch.from_numpy(w[:, :-1] * (labels[:, 1:] != -100)).reshape(-1)
        return (ce * weight).sum() / weight.sum()

    _compare(jax_loss, torch_loss, [rng.normal(size=(B, T, V))], dtype=jnp.float64)


def test_direct_calls_and_counts(x64):
    """The functions themselves (not through term_sums), and the documented counts."""
    rng = np.random.default_rng(3)
    real, keys, mask, _ = _layout("packed")
    rows = jnp.asarray(real, jnp.float32)
    n_rows = real.sum()
    s = jnp.asarray(rng.normal(size=(B, T, V)))
    assert float(terms.kl(s, s + 1.0, rows, temperature=2.0)["count"]) == n_rows
    hs, ht = jnp.asarray(rng.normal(size=(2, B, T, D_S))), jnp.asarray(rng.normal(size=(3, B, T, D_T)))
    proj = init_projection(jax.random.key(1), D_S, D_T)
    assert proj["kernel"].shape == (D_S, D_T) and proj["bias"].shape == (D_T,)
    out = terms.hidden_mse(hs, ht, rows, proj, layers=[[0, 0], [1, 2]], layer_reduce="mean")
    assert float(out["count"]) == n_rows * D_T * 2  # rows x teacher width x pairs
    scores = jnp.asarray(rng.normal(size=(1, B, 2, T, T)))
    out = terms.attention_mse(scores, scores, rows, mask)
    assert float(out["count"]) == 2 * (keys & real[:, :, None]).sum() and float(out["sum"]) == 0.0
    q = [jnp.asarray(rng.normal(size=(B, T, D_S)))]  # per-layer lists of [B, T, D] work too
    t = [jnp.asarray(rng.normal(size=(B, T, 15)))]
    out = terms.minilmv2_relations(q, q, q, t, t, t, rows, mask, relation_heads=5)
    assert float(out["count"]) == n_rows * 5 and float(out["sum"]) > 0


# --------------------------------------------------------------------------------------------------
# Registry and errors: one line each, naming the key and the fix.
# --------------------------------------------------------------------------------------------------


def _one_line(fn, *needles):
    with pytest.raises(UserError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_registry():
    for name, spec in TERMS.items():
        assert spec.name == name and callable(spec.fn) and spec.description and "\n" not in spec.description
        assert resolve_options(name) == dict(spec.options)
    assert resolve_options("jsd", {"beta": 0.9}) == {"temperature": 2.0, "beta": 0.9}
    assert TERMS["minilmv2_relations"].inputs == ("queries", "keys", "values")
    assert not TERMS["mlm_ce"].teacher and TERMS["mlm_ce"].needs == ("labels",)


@pytest.mark.parametrize("name,options,needles", [
    ("kl", {"temprature": 2.0}, ["temprature", "temperature"]),
    ("logits_mse", {"temperature": 2.0}, ["temperature", "none"]),
    ("kl", {"temperature": 0}, ["temperature", "> 0"]),
    ("jsd", {"beta": 1.0}, ["beta", "between 0 and 1"]),
    ("hidden_cos", {"layer_reduce": "avg"}, ["layer_reduce", "sum, mean"]),
    ("hidden_cos", {"layers": "last"}, ["layers", "[[2, 4], [4, 8]]"]),
    ("minilmv2_relations", {"relation_heads": 0}, ["relation_heads", "positive integer"]),
    ("minilmv2_relations", {"relation_weights": [1.0, -1.0, 1.0]}, ["relation_weights", "three weights"]),
])
def test_bad_options(name, options, needles):
    _one_line(lambda: resolve_options(name, options), name, *needles)


def test_unknown_term_and_missing_inputs():
    _one_line(lambda: resolve_options("kld"), "kld", "kl, reverse_kl")
    s = jnp.zeros((B, T, V))
    rows = jnp.ones((B, T))
    _one_line(lambda: term_sums("kl", {"logits": s}, None, rows), "teacher's logits")
    _one_line(lambda: term_sums("mlm_ce", {"logits": s}, None, rows), "labels")
    _one_line(lambda: term_sums("kl", {"logits": s}, {"logits": s}, rows, mask=rows), "mask")
    _one_line(lambda: term_sums("kl", {"logits": s}, {"logits": s}, rows[:, :-1]), "rows", "(3, 6)")


def test_layer_out_of_range():
    hs, ht = jnp.zeros((L_S + 1, B, T, D_T)), jnp.zeros((L_T + 1, B, T, D_T))
    rows = jnp.ones((B, T))
    _one_line(lambda: terms.hidden_cos(hs, ht, rows, layers=[[0, 0], [L_S + 1, 2]]),
              "student layer 4", "0..3", "layers")
    probs = jnp.zeros((L_T, B, 2, T, T))
    mask = jnp.ones((B, 1, T, T), bool)
    _one_line(lambda: terms.attention_kl(probs, probs, rows, mask, layers=[[0, -5]]),
              "teacher layer -5", "layers")


@pytest.mark.parametrize("name", ["attention_kl", "attention_mse", "value_relation_kl"])
def test_head_count_mismatch(name):
    rows, mask = jnp.ones((B, T)), jnp.ones((B, 1, T, T), bool)
    if name == "value_relation_kl":
        s, t = jnp.zeros((L_S, B, T, 2, 5)), jnp.zeros((L_T, B, T, 5, 3))
    else:
        s, t = jnp.zeros((L_S, B, 2, T, T)), jnp.zeros((L_T, B, 5, T, T))
    _one_line(lambda: getattr(terms, name)(s, t, rows, mask), "2 heads", "5", "minilmv2_relations")


def test_width_mismatch_and_bad_projection():
    hs, ht = jnp.zeros((L_S + 1, B, T, D_S)), jnp.zeros((L_T + 1, B, T, D_T))
    rows = jnp.ones((B, T))
    for fn in (terms.hidden_mse, terms.hidden_cos):
        _one_line(lambda fn=fn: fn(hs, ht, rows), "width 10", "14", "init_projection")
    bad = init_projection(jax.random.key(0), D_T, D_S)
    _one_line(lambda: terms.hidden_mse(hs, ht, rows, bad), "kernel [10, 14]", "(14, 10)")
    q = jnp.zeros((L_S, B, T, 2, 5))
    t = jnp.zeros((L_T, B, T, 5, 3))
    _one_line(lambda: terms.minilmv2_relations(q, q, q, t, t, t, rows, jnp.ones((B, T, T), bool), relation_heads=4),
              "relation_heads=4", "width 10")
