"""A library of distillation loss terms: pure functions returning a sum and a count, and a registry.

Every term returns ``{"sum": scalar, "count": scalar}`` (at least float32; float64 inputs stay
float64): the loss is ``sum / count``, and sums and counts of micro-batches and devices add up
exactly before the one division, as ``losses.loss_sums`` / ``combine_losses`` do. The count is what
the mean divides by (rows, rows x heads, ...: each term says). Row selection is a [B, T] (or [N])
float weight array ``rows``: 1 on the positions that count, 0 on padding (other weights are fine:
every sum is weighted by it, every count is the sum of the weights). Attention terms also take the
boolean key mask ``mask`` ([B, 1, T, S], [B, T, S] or broadcastable, True = key visible, as
``models.layers.attention_mask_from`` gives for padding, packed segments and causal LMs): hidden
keys have probability 0 and contribute nothing. Teacher inputs are constants (``stop_gradient``).
All arithmetic runs in float32 at least (``losses._f32``), whatever the models computed in.

Notation: s, t student / teacher logits [..., V]; P = softmax(t / T), Q = softmax(s / T);
KL(A || B) = sum_v A_v (log A_v - log B_v), with A_v log A_v = 0 where A_v = 0.

Soft targets on logits [N, V] or [B, T, V] (count: sum of row weights)
  kl            T^2 KL(P || Q) per row. Hinton et al. 2015; DistilBERT's L_ce (Sanh et al. 2019).
  reverse_kl    T^2 KL(Q || P) per row (mode-seeking; Agarwal et al. 2024, "GKD", as a divergence).
  jsd           T^2 JSD_beta per row, M = beta P + (1 - beta) Q,
                JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M), beta in (0, 1): the generalised
                Jensen-Shannon divergence of GKD (Agarwal et al. 2024, "On-policy distillation of
                language models"), computed in log space (log M = logaddexp).
  logits_mse    sum over the vocab of (s - t)^2 per row: DistilBERT's optional L_mse.
Hard targets (student only)
  mlm_ce        cross-entropy of s at the labelled rows (labels != -100); count: their weights.
  clm_ce        causal next-token cross-entropy: ``labels`` are UNSHIFTED (the input ids, -100 where
                a token is no target, e.g. padding); the logits at position t are scored against
                labels[:, t + 1], with the row weight of position t (the row whose logits are scored),
                for t < T - 1; with ``segment_ids`` (packed rows, 0 = padding) only pairs inside one
                segment count. This is the reference's ``cross_entropy(logits[:, :-1], labels[:, 1:])``.
                (Labels shifted already, like ``data.masking.causal_labels``, go to mlm_ce instead.)
Hidden states [L + 1, B, T, D] (index 0 = the embeddings output), for (student, teacher) layer pairs;
an optional learned projection {kernel [D_s, D_t], bias [D_t]} maps the student's states to the
teacher's width first (``init_projection``); different widths without one are an error.
  hidden_cos    1 - cos(h_s, h_t) per row, torch ``cosine_embedding_loss`` (target 1) semantics:
                DistilBERT's L_cos (last layers). Count: row weights.
  hidden_mse    sum over the width of (h_s W + b - h_t)^2 per row, divided by the count rows x D_t
                (the TEACHER's width): the per-element mean squared error of TinyBERT's hidden-state
                loss (Jiao et al. 2020), padding excluded.
Attention, per layer pair and per head (student and teacher need equal head counts; their head
widths may differ). Layer indices of attention inputs [L, ...] count the layers from 0.
  attention_kl  MiniLM's attention transfer (Wang et al. 2020): KL(A_t || A_s) over the visible keys
                of each query row and head, A = attention probabilities [L, B, N, T, S] (what
                ``encode`` returns); count: row weights x heads. A student probability that
                underflowed to 0 on a visible key is read as float's smallest normal number.
  attention_mse TinyBERT's attention loss: (a_s - a_t)^2 on the attention SCORES (scaled, before the
                softmax) [L, B, N, T, S], only over the visible entries (query row weighted, key
                visible): TinyBERT zeroes the masked scores, here they are left out, so the count is
                heads x sum over (b, t, s) of rows[b, t] * mask[b, t, s] (visible entries, not B N T S).
  value_relation_kl  MiniLM's value relation: VR = softmax(V V^T / sqrt(d_head)) per head over the
                visible keys, V [L, B, T, N, H] (the layer's values); KL(VR_t || VR_s); count: row
                weights x heads.
  minilmv2_relations  MiniLMv2 (Wang et al. 2021): for X in (queries, keys, values) [L, B, T, N, H]
                (or [L, B, T, D]), the heads are concatenated back to width D and split into R
                relation heads of width D / R (the same R for both models, so widths and head counts
                may differ); relation_r = softmax(X_r X_r^T / sqrt(D / R)) over the visible keys;
                loss = sum over the three types of weight x mean over relation heads and query rows
                of KL(teacher relation || student relation). Count: row weights x R.
Several layer pairs (option ``layers``, default the last pair) are summed (``layer_reduce="sum"``,
TinyBERT's sum over layers: sum = sum of the pairs' sums, count = one pair's count) or averaged
(``"mean"``: the count is multiplied by the number of pairs).

``TERMS`` maps each name to a ``TermSpec`` (function, inputs, options with defaults, description);
``resolve_options`` checks a term's options (one-line ``UserError`` naming the key and the fix) and
``term_sums`` computes a term from dicts of model outputs.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdistil.data.masking import IGNORE_INDEX
from jaxdistil.distill.losses import _f32, kl_per_row, one_minus_cos_per_row, sq_err_per_row, xent_per_row
from jaxdistil.errors import UserError

Sums = dict[str, jax.Array]  # {"sum": scalar, "count": scalar}

LAYER_REDUCE = ("sum", "mean")
RELATION_TYPES = ("queries", "keys", "values")  # minilmv2_relations: query-query, key-key, value-value


# --------------------------------------------------------------------------------------------------
# Options: checks shared by the functions and the registry.
# --------------------------------------------------------------------------------------------------


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _check_option(term: str, key: str, value) -> None:
    """One-line UserError if ``value`` is not a valid ``key`` option of ``term``."""
    where = f"term {term}: option {key}"
    if key == "temperature":
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise UserError(f"{where} must be a number > 0, got {value!r}; e.g. {key}=2.0")
    elif key == "beta":
        if not (_is_number(value) and 0 < value < 1):
            raise UserError(f"{where} must be a number strictly between 0 and 1, got {value!r}; e.g. {key}=0.5")
    elif key == "layers":
        ok = value is None or (
            isinstance(value, Sequence) and not isinstance(value, str) and len(value) > 0
            and all(isinstance(p, Sequence) and not isinstance(p, str) and len(p) == 2
                    and all(_is_int(i) for i in p) for p in value))
        if not ok:
            raise UserError(f"{where} must be a non-empty list of [student_layer, teacher_layer] integer pairs "
                            f"(or null for the last pair), got {value!r}; e.g. {key}=[[2, 4], [4, 8]]")
    elif key == "layer_reduce":
        if value not in LAYER_REDUCE:
            raise UserError(f"{where} must be one of {', '.join(LAYER_REDUCE)}, got {value!r}")
    elif key == "relation_heads":
        if not (_is_int(value) and value >= 1):
            raise UserError(f"{where} must be a positive integer, got {value!r}; e.g. {key}=48")
    elif key == "relation_weights":
        ok = (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == len(RELATION_TYPES)
              and all(_is_number(w) and math.isfinite(w) and w >= 0 for w in value))
        if not ok:
            raise UserError(f"{where} must be three weights >= 0 (query-query, key-key, value-value), "
                            f"got {value!r}; e.g. {key}=[1.0, 1.0, 1.0]")
    else:  # pragma: no cover - every registered option has a check
        raise UserError(f"{where} is unknown")


def _check_options(term: str, **options) -> None:
    for key, value in options.items():
        _check_option(term, key, value)


def _teacher(x):
    return jax.lax.stop_gradient(x)


def _row_weights(term: str, rows: jax.Array, shape: tuple[int, ...], like: jax.Array) -> jax.Array:
    """rows as float weights of ``shape`` (the inputs' row dims), in the dtype the term computes in
    (float32, or float64 when ``like`` or rows is float64: counts then add up in float64 too);
    one-line UserError for another shape."""
    rows = jnp.asarray(rows)
    if rows.shape != tuple(shape):
        raise UserError(f"term {term}: rows has shape {rows.shape} but the inputs have rows {tuple(shape)}; "
                        "pass one weight per row (1 = counts, 0 = padding)")
    return rows.astype(jnp.promote_types(jnp.promote_types(rows.dtype, like.dtype), jnp.float32))


def _same_shape(term: str, what: str, s_shape, t_shape) -> None:
    if tuple(s_shape) != tuple(t_shape):
        raise UserError(f"term {term}: student {what} {tuple(s_shape)} and teacher {what} {tuple(t_shape)} "
                        "differ; give both models the same batch")


def _labels_fit(term: str, what: str, x, rows_shape) -> None:
    if tuple(x.shape) != tuple(rows_shape):
        raise UserError(f"term {term}: {what} has shape {tuple(x.shape)} but the logits have rows "
                        f"{tuple(rows_shape)}; pass {what} of shape {tuple(rows_shape)}")


def _result(total: jax.Array, count: jax.Array) -> Sums:
    return {"sum": total, "count": jnp.asarray(count)}


# --------------------------------------------------------------------------------------------------
# Soft and hard targets on logits.
# --------------------------------------------------------------------------------------------------


def _logit_pair(term, s_logits, t_logits, rows):
    _same_shape(term, "logits", s_logits.shape, t_logits.shape)
    return _row_weights(term, rows, s_logits.shape[:-1], s_logits), _teacher(t_logits)


def kl(s_logits: jax.Array, t_logits: jax.Array, rows: jax.Array, *, temperature: float = 2.0) -> Sums:
    """T^2 KL(softmax(t/T) || softmax(s/T)) per row; logits [..., V], rows [...]; count: sum of rows."""
    _check_options("kl", temperature=temperature)
    w, t_logits = _logit_pair("kl", s_logits, t_logits, rows)
    per_row = kl_per_row(s_logits, t_logits, temperature)
    return _result(jnp.sum(per_row * w) * temperature**2, jnp.sum(w))


def reverse_kl(s_logits: jax.Array, t_logits: jax.Array, rows: jax.Array, *, temperature: float = 2.0) -> Sums:
    """T^2 KL(softmax(s/T) || softmax(t/T)) per row (the student's distribution first); count: sum of rows."""
    _check_options("reverse_kl", temperature=temperature)
    w, t_logits = _logit_pair("reverse_kl", s_logits, t_logits, rows)
    per_row = kl_per_row(t_logits, s_logits, temperature)  # kl_per_row(a, b) = KL(softmax(b/T) || softmax(a/T))
    return _result(jnp.sum(per_row * w) * temperature**2, jnp.sum(w))


def jsd(s_logits: jax.Array, t_logits: jax.Array, rows: jax.Array, *, temperature: float = 2.0,
        beta: float = 0.5) -> Sums:
    """T^2 generalised Jensen-Shannon divergence per row (GKD): M = beta P + (1 - beta) Q,
    beta KL(P || M) + (1 - beta) KL(Q || M), P = softmax(t/T) the teacher's, Q = softmax(s/T)."""
    _check_options("jsd", temperature=temperature, beta=beta)
    w, t_logits = _logit_pair("jsd", s_logits, t_logits, rows)
    log_q = jax.nn.log_softmax(_f32(s_logits) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(_f32(t_logits) / temperature, axis=-1)
    log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p, q = jnp.exp(log_p), jnp.exp(log_q)
    kl_p = jnp.sum(jnp.where(p > 0, p * (log_p - log_m), 0.0), axis=-1)
    kl_q = jnp.sum(jnp.where(q > 0, q * (log_q - log_m), 0.0), axis=-1)
    per_row = beta * kl_p + (1.0 - beta) * kl_q
    return _result(jnp.sum(per_row * w) * temperature**2, jnp.sum(w))


def logits_mse(s_logits: jax.Array, t_logits: jax.Array, rows: jax.Array) -> Sums:
    """Sum over the vocab of (s - t)^2 per row (DistilBERT's L_mse); count: sum of rows."""
    w, t_logits = _logit_pair("logits_mse", s_logits, t_logits, rows)
    return _result(jnp.sum(sq_err_per_row(s_logits, t_logits) * w), jnp.sum(w))


def mlm_ce(s_logits: jax.Array, labels: jax.Array, rows: jax.Array) -> Sums:
    """Cross-entropy of the student's logits [..., V] at the labelled rows (labels [...], -100 =
    ignored); count: sum of rows over the labelled rows."""
    w = _row_weights("mlm_ce", rows, s_logits.shape[:-1], s_logits)
    labels = jnp.asarray(labels)
    _labels_fit("mlm_ce", "labels", labels, s_logits.shape[:-1])
    loss, _ = xent_per_row(s_logits, labels)
    w = jnp.where(labels != IGNORE_INDEX, w, 0.0)
    return _result(jnp.sum(loss * w), jnp.sum(w))


def clm_ce(s_logits: jax.Array, labels: jax.Array, rows: jax.Array, segment_ids: jax.Array | None = None) -> Sums:
    """Next-token cross-entropy: logits [B, T, V] at position t against labels[:, t + 1] (labels [B, T]
    unshifted, -100 = no target), weighted by rows[:, t], t < T - 1; with segment_ids [B, T] (packed
    rows, 0 = padding) only pairs of one segment count. Count: the weights of the pairs that count."""
    if s_logits.ndim != 3:
        raise UserError(f"term clm_ce: logits must be [B, T, V] (the shift runs along T), got {s_logits.shape}")
    w = _row_weights("clm_ce", rows, s_logits.shape[:-1], s_logits)
    labels = jnp.asarray(labels)
    _labels_fit("clm_ce", "labels", labels, s_logits.shape[:-1])
    target = labels[:, 1:]
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        _labels_fit("clm_ce", "segment_ids", seg, s_logits.shape[:-1])
        same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
        target = jnp.where(same, target, IGNORE_INDEX)
    loss, _ = xent_per_row(s_logits[:, :-1], target)
    w = jnp.where(target != IGNORE_INDEX, w[:, :-1], 0.0)
    return _result(jnp.sum(loss * w), jnp.sum(w))


# --------------------------------------------------------------------------------------------------
# Layer pairs, hidden states and the projection.
# --------------------------------------------------------------------------------------------------


def _layer_pairs(term: str, layers, n_student: int, n_teacher: int, what: str) -> list[tuple[int, int]]:
    """``layers`` (None = the last pair) as non-negative (student, teacher) indices; one-line UserError
    for an index out of range. Negative indices count from the end, as in Python."""
    _check_option(term, "layers", layers)
    pairs = [(-1, -1)] if layers is None else [tuple(p) for p in layers]
    out = []
    for i, j in pairs:
        for side, idx, n in (("student", i, n_student), ("teacher", j, n_teacher)):
            if not -n <= idx < n:
                raise UserError(f"term {term}: {side} layer {idx} of pair [{i}, {j}] is out of range, the {side} "
                                f"has {n} {what} (indices 0..{n - 1} or -{n}..-1); fix option layers")
        out.append((i % n_student, j % n_teacher))
    return out


def _pair_count(count: jax.Array, n_pairs: int, layer_reduce: str) -> jax.Array:
    return count * n_pairs if layer_reduce == "mean" else count


def init_projection(key: jax.Array, d_s: int, d_t: int, std: float = 0.02) -> dict[str, jax.Array]:
    """A learned projection of student states to the teacher's width: {kernel [d_s, d_t] ~ N(0, std^2),
    bias [d_t] = 0}, float32 (the argument ``projection`` of hidden_cos / hidden_mse)."""
    if not (_is_int(d_s) and _is_int(d_t) and d_s >= 1 and d_t >= 1):
        raise UserError(f"init_projection: widths must be positive integers, got d_s={d_s!r}, d_t={d_t!r}")
    if not (_is_number(std) and std >= 0):
        raise UserError(f"init_projection: std must be a number >= 0, got {std!r}; e.g. std=0.02")
    return {"kernel": std * jax.random.normal(key, (d_s, d_t), jnp.float32), "bias": jnp.zeros((d_t,), jnp.float32)}


def _projections(term: str, projection, n_pairs: int, d_s: int, d_t: int) -> list:
    """One projection (or None) per layer pair: ``projection`` is None, one {kernel, bias} shared by
    all pairs, or a sequence of one per pair."""
    if projection is None:
        if d_s != d_t:
            raise UserError(f"term {term}: student width {d_s} differs from teacher width {d_t}; pass a learned "
                            f"projection (init_projection(key, {d_s}, {d_t}, std)) or map layers of equal width")
        return [None] * n_pairs
    projs = [projection] * n_pairs if isinstance(projection, Mapping) else list(projection)
    if len(projs) != n_pairs:
        raise UserError(f"term {term}: {len(projs)} projections for {n_pairs} layer pairs; pass one {{kernel, bias}} "
                        "shared by all pairs or one per pair")
    for p in projs:
        if not (isinstance(p, Mapping) and set(p) == {"kernel", "bias"}
                and tuple(p["kernel"].shape) == (d_s, d_t) and tuple(p["bias"].shape) == (d_t,)):
            shapes = {k: tuple(v.shape) for k, v in p.items()} if isinstance(p, Mapping) else type(p).__name__
            raise UserError(f"term {term}: projection must be {{kernel [{d_s}, {d_t}], bias [{d_t}]}} (student to "
                            f"teacher width), got {shapes}; make it with init_projection(key, {d_s}, {d_t}, std)")
    return projs


def _hidden_pairs(term, s_states, t_states, rows, projection, layers):
    """(student states projected to the teacher's width, teacher states) [B, T, D_t] per pair, and
    the row weights."""
    pairs = _layer_pairs(term, layers, len(s_states), len(t_states), "hidden states")
    d_s, d_t = s_states[0].shape[-1], t_states[0].shape[-1]
    projs = _projections(term, projection, len(pairs), d_s, d_t)
    w = _row_weights(term, rows, s_states[0].shape[:-1], s_states[0])
    _same_shape(term, "rows", s_states[0].shape[:-1], t_states[0].shape[:-1])
    out = []
    for (i, j), p in zip(pairs, projs):
        s = _f32(s_states[i])
        if p is not None:
            s = s @ _f32(jnp.asarray(p["kernel"])) + _f32(jnp.asarray(p["bias"]))
        out.append((s, _f32(_teacher(t_states[j]))))
    return out, w


def hidden_cos(s_hidden_states, t_hidden_states, rows: jax.Array, projection=None, *, layers=None,
               layer_reduce: str = "sum") -> Sums:
    """1 - cos(student state (projected), teacher state) per row and layer pair (torch
    cosine_embedding_loss, target 1). hidden states [L + 1, B, T, D] (or sequences of [B, T, D]),
    index 0 the embeddings output. Count: sum of rows (x pairs with layer_reduce="mean")."""
    _check_options("hidden_cos", layer_reduce=layer_reduce)
    pairs, w = _hidden_pairs("hidden_cos", s_hidden_states, t_hidden_states, rows, projection, layers)
    total = sum(jnp.sum(one_minus_cos_per_row(s, t) * w) for s, t in pairs)
    return _result(total, _pair_count(jnp.sum(w), len(pairs), layer_reduce))


def hidden_mse(s_hidden_states, t_hidden_states, rows: jax.Array, projection=None, *, layers=None,
               layer_reduce: str = "sum") -> Sums:
    """TinyBERT's hidden-state MSE: sum over the width of (h_s W + b - h_t)^2 per row and pair.
    Count: sum of rows x the TEACHER's width D_t (x pairs with layer_reduce="mean"), so the loss is
    the mean squared error per element."""
    _check_options("hidden_mse", layer_reduce=layer_reduce)
    pairs, w = _hidden_pairs("hidden_mse", s_hidden_states, t_hidden_states, rows, projection, layers)
    total = sum(jnp.sum(sq_err_per_row(s, t) * w) for s, t in pairs)
    d_t = pairs[0][1].shape[-1]
    return _result(total, _pair_count(jnp.sum(w) * d_t, len(pairs), layer_reduce))


# --------------------------------------------------------------------------------------------------
# Attention and relations.
# --------------------------------------------------------------------------------------------------


def _key_mask(term: str, mask: jax.Array, b: int, t: int, s: int) -> jax.Array:
    """The boolean key mask as [B, 1, T, S] (from [B, 1, T, S], [B, T, S] or anything broadcastable)."""
    m = jnp.asarray(mask)
    if m.ndim == 3:
        m = m[:, None]
    try:
        return jnp.broadcast_to(m.astype(bool), (b, 1, t, s))
    except ValueError:
        raise UserError(f"term {term}: the key mask {tuple(jnp.shape(mask))} does not fit [B, 1, T, S] = "
                        f"[{b}, 1, {t}, {s}]; pass attention_mask_from(...) of the batch") from None


def _check_heads(term: str, what: str, layout: str, s0, t0, head_axis: int) -> None:
    """One layer of each model's per-head inputs: 4-d (``layout`` without its L) with equal head counts
    on ``head_axis``; one-line UserError otherwise."""
    if s0.ndim != 4 or t0.ndim != 4:
        raise UserError(f"term {term}: {what} must be {layout}, got layers of shape {s0.shape} (student) "
                        f"and {t0.shape} (teacher)")
    if s0.shape[head_axis] != t0.shape[head_axis]:
        raise UserError(f"term {term} compares heads one to one: the student has {s0.shape[head_axis]} heads, "
                        f"the teacher {t0.shape[head_axis]}; use minilmv2_relations, which works with any head counts")


def _attention_pairs(term, s_att, t_att, rows, mask, layers):
    """Per pair: (student [B, N, T, S], teacher [B, N, T, S]) at least float32; the key mask
    [B, 1, T, S]; the row weights [B, T]; the head count."""
    pairs = _layer_pairs(term, layers, len(s_att), len(t_att), "attention layers")
    s0, t0 = s_att[0], t_att[0]
    _check_heads(term, "attention inputs", "[L, B, N, T, S]", s0, t0, head_axis=1)
    _same_shape(term, "attention", s0.shape, t0.shape)
    b, n, t, s = s0.shape
    vis = _key_mask(term, mask, b, t, s)
    w = _row_weights(term, rows, (b, t), s0)
    return [(_f32(s_att[i]), _f32(_teacher(t_att[j]))) for i, j in pairs], vis, w, n


def attention_kl(s_probs, t_probs, rows: jax.Array, mask: jax.Array, *, layers=None,
                 layer_reduce: str = "sum") -> Sums:
    """MiniLM's attention transfer: KL(teacher attention || student attention) over the visible keys
    of each query row and head; probabilities [L, B, N, T, S]. Count: sum of rows x heads (x pairs
    with layer_reduce="mean")."""
    _check_options("attention_kl", layer_reduce=layer_reduce)
    pairs, vis, w, n = _attention_pairs("attention_kl", s_probs, t_probs, rows, mask, layers)
    total = 0.0
    for p_s, p_t in pairs:
        keep = vis & (p_t > 0)
        log_t = jnp.log(jnp.where(keep, p_t, 1.0))
        log_s = jnp.log(jnp.maximum(jnp.where(vis, p_s, 1.0), jnp.finfo(p_s.dtype).tiny))
        per_row = jnp.sum(jnp.where(keep, p_t * (log_t - log_s), 0.0), axis=-1)  # [B, N, T]
        total = total + jnp.sum(per_row * w[:, None, :])
    return _result(total, _pair_count(jnp.sum(w) * n, len(pairs), layer_reduce))


def attention_mse(s_scores, t_scores, rows: jax.Array, mask: jax.Array, *, layers=None,
                  layer_reduce: str = "sum") -> Sums:
    """TinyBERT's attention MSE on the scaled scores before the softmax [L, B, N, T, S], over the
    visible entries only. Count: heads x sum over (b, t, s) of rows[b, t] * mask[b, t, s] (x pairs
    with layer_reduce="mean")."""
    _check_options("attention_mse", layer_reduce=layer_reduce)
    pairs, vis, w, n = _attention_pairs("attention_mse", s_scores, t_scores, rows, mask, layers)
    entry_w = jnp.where(vis, w[:, None, :, None], 0.0)  # [B, 1, T, S]
    total = 0.0
    for a_s, a_t in pairs:
        d = jnp.where(vis, a_s - a_t, 0.0)  # hidden keys (float min or -inf scores) drop out exactly
        total = total + jnp.sum(d * d * entry_w)
    return _result(total, _pair_count(jnp.sum(entry_w) * n, len(pairs), layer_reduce))


def _relation_scores(x: jax.Array, groups: int, vis: jax.Array) -> jax.Array:
    """x [B, T, G * h] split in G groups of width h -> x_g x_g^T / sqrt(h) [B, G, T, S], hidden keys
    at the dtype's most negative value (probability 0 after the softmax)."""
    b, t, d = x.shape
    xg = _f32(x).reshape(b, t, groups, d // groups)
    sc = jnp.einsum("btgh,bsgh->bgts", xg, xg) / math.sqrt(d // groups)
    return jnp.where(vis, sc, jnp.finfo(sc.dtype).min)


def _relation_kl(s_x, t_x, groups_s: int, groups_t: int, vis, w) -> jax.Array:
    """Weighted sum over rows and groups of KL(teacher relation || student relation)."""
    per_row = kl_per_row(_relation_scores(s_x, groups_s, vis), _relation_scores(_teacher(t_x), groups_t, vis), 1.0)
    return jnp.sum(per_row * w[:, None, :])


def value_relation_kl(s_values, t_values, rows: jax.Array, mask: jax.Array, *, layers=None,
                      layer_reduce: str = "sum") -> Sums:
    """MiniLM's value relation: KL(softmax(V_t V_t^T / sqrt(H_t)) || softmax(V_s V_s^T / sqrt(H_s))) per
    head and query row, over the visible keys; values [L, B, T, N, H] (head widths may differ, head
    counts may not). Count: sum of rows x heads (x pairs with layer_reduce="mean")."""
    term = "value_relation_kl"
    _check_options(term, layer_reduce=layer_reduce)
    pairs = _layer_pairs(term, layers, len(s_values), len(t_values), "attention layers")
    s0, t0 = s_values[0], t_values[0]
    _check_heads(term, "values", "[L, B, T, N, H]", s0, t0, head_axis=2)
    _same_shape(term, "rows", s0.shape[:2], t0.shape[:2])
    b, t, n, _ = s0.shape
    vis = _key_mask(term, mask, b, t, t)
    w = _row_weights(term, rows, (b, t), s0)
    total = sum(_relation_kl(s_values[i].reshape(b, t, -1), t_values[j].reshape(b, t, -1), n, n, vis, w)
                for i, j in pairs)
    return _result(total, _pair_count(jnp.sum(w) * n, len(pairs), layer_reduce))


def minilmv2_relations(s_queries, s_keys, s_values, t_queries, t_keys, t_values, rows: jax.Array,
                       mask: jax.Array, *, relation_heads: int = 48, relation_weights=(1.0, 1.0, 1.0),
                       layers=None, layer_reduce: str = "sum") -> Sums:
    """MiniLMv2's self-attention relations (query-query, key-key, value-value) with R relation heads.

    Inputs [L, B, T, N, H] (or [L, B, T, D]; per layer, the heads concatenated give width D), any
    head counts and widths on either side as long as R divides both widths. Sum: over layer pairs and
    the three types (weights ``relation_weights``) of the weighted sums over rows and relation heads
    of KL(teacher relation || student relation). Count: sum of rows x R (x pairs with
    layer_reduce="mean").
    """
    term = "minilmv2_relations"
    _check_options(term, relation_heads=relation_heads, relation_weights=relation_weights,
                   layer_reduce=layer_reduce)
    students, teachers = (s_queries, s_keys, s_values), (t_queries, t_keys, t_values)
    n_s, n_t = len(s_queries), len(t_queries)
    for kind, xs, xt in zip(RELATION_TYPES, students, teachers):
        if len(xs) != n_s or len(xt) != n_t:
            raise UserError(f"term {term}: {kind} have {len(xs)} student / {len(xt)} teacher layers, the queries "
                            f"{n_s} / {n_t}; pass queries, keys and values of the same layers")
    pairs = _layer_pairs(term, layers, n_s, n_t, "attention layers")
    b, t = s_queries[0].shape[:2]
    _same_shape(term, "rows", (b, t), t_queries[0].shape[:2])
    r = relation_heads
    for side, x in (("student", s_queries[0]), ("teacher", t_queries[0])):
        d = math.prod(x.shape[2:])
        if d % r:
            raise UserError(f"term {term}: option relation_heads={r} does not divide the {side} width {d}; "
                            "choose a common divisor of both models' widths")
    vis = _key_mask(term, mask, b, t, t)
    w = _row_weights(term, rows, (b, t), s_queries[0])
    total = 0.0
    for i, j in pairs:
        for weight, xs, xt in zip(relation_weights, students, teachers):
            if weight:
                total = total + weight * _relation_kl(xs[i].reshape(b, t, -1), xt[j].reshape(b, t, -1), r, r, vis, w)
    return _result(total, _pair_count(jnp.sum(w) * r, len(pairs), layer_reduce))


# --------------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TermSpec:
    """A loss term: ``fn(*student inputs, *teacher inputs, rows=rows, **extras, **options)``.

    inputs:      the model outputs it reads, in ``fn``'s order ("logits", "hidden_states",
                 "attention_probs", "attention_scores", "queries", "keys", "values"), from the student
                 and, if ``teacher``, then from the teacher.
    teacher:     whether it needs the teacher (hard-target terms do not).
    needs:       batch arrays it requires, passed by keyword ("labels", "mask").
    accepts:     optional keyword arguments ("segment_ids", "projection").
    options:     option name -> default.
    description: one line.
    """

    name: str
    fn: Callable[..., Sums]
    inputs: tuple[str, ...]
    options: Mapping[str, Any]
    description: str
    teacher: bool = True
    needs: tuple[str, ...] = ()
    accepts: tuple[str, ...] = ()


def _spec(name, fn, inputs, options, description, **kw) -> TermSpec:
    return TermSpec(name, fn, tuple(inputs), types.MappingProxyType(dict(options)), description, **kw)


_LAYERS = {"layers": None, "layer_reduce": "sum"}

TERMS: dict[str, TermSpec] = {s.name: s for s in (
    _spec("kl", kl, ["logits"], {"temperature": 2.0},
          "T^2 KL(teacher || student) of the softened distributions (DistilBERT's L_ce)"),
    _spec("reverse_kl", reverse_kl, ["logits"], {"temperature": 2.0},
          "T^2 KL(student || teacher) of the softened distributions (mode-seeking)"),
    _spec("jsd", jsd, ["logits"], {"temperature": 2.0, "beta": 0.5},
          "T^2 generalised Jensen-Shannon divergence with mixture beta P_t + (1 - beta) P_s (GKD)"),
    _spec("logits_mse", logits_mse, ["logits"], {},
          "sum over the vocab of squared logit differences per row (DistilBERT's L_mse)"),
    _spec("mlm_ce", mlm_ce, ["logits"], {}, "masked-LM cross-entropy on the labelled rows (labels -100 ignored)",
          teacher=False, needs=("labels",)),
    _spec("clm_ce", clm_ce, ["logits"], {}, "next-token cross-entropy, logits at t against unshifted labels at t + 1",
          teacher=False, needs=("labels",), accepts=("segment_ids",)),
    _spec("hidden_cos", hidden_cos, ["hidden_states"], _LAYERS,
          "1 - cosine of mapped hidden states, optionally projected to the teacher's width (DistilBERT's L_cos)",
          accepts=("projection",)),
    _spec("hidden_mse", hidden_mse, ["hidden_states"], _LAYERS,
          "mean squared error per element of mapped hidden states, rows x teacher width (TinyBERT)",
          accepts=("projection",)),
    _spec("attention_kl", attention_kl, ["attention_probs"], _LAYERS,
          "KL(teacher || student) of attention distributions per head and query row (MiniLM)", needs=("mask",)),
    _spec("attention_mse", attention_mse, ["attention_scores"], _LAYERS,
          "mean squared error of pre-softmax attention scores over visible entries (TinyBERT)", needs=("mask",)),
    _spec("value_relation_kl", value_relation_kl, ["values"], _LAYERS,
          "KL(teacher || student) of softmax(V V^T / sqrt(d_head)) per head and query row (MiniLM)", needs=("mask",)),
    _spec("minilmv2_relations", minilmv2_relations, ["queries", "keys", "values"],
          {"relation_heads": 48, "relation_weights": (1.0, 1.0, 1.0), **_LAYERS},
          "KL of query-query, key-key and value-value relations over R relation heads (MiniLMv2)", needs=("mask",)),
)}


def resolve_options(name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The term's options: its defaults updated with ``options``, each checked; one-line UserError for
    an unknown term, an unknown option name or a bad value."""
    if name not in TERMS:
        raise UserError(f"unknown loss term {name!r}; the terms are {', '.join(TERMS)}")
    spec = TERMS[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        known = ", ".join(spec.options) if spec.options else "none"
        raise UserError(f"term {name} has no option {unknown[0]!r}; its options are: {known}")
    out = {**spec.options, **options}
    _check_options(name, **out)
    return out


def term_sums(name: str, student: Mapping[str, Any], teacher: Mapping[str, Any] | None, rows: jax.Array,
              options: Mapping[str, Any] | None = None, **extras) -> Sums:
    """Computes term ``name`` from the models' outputs: ``student`` / ``teacher`` map input names
    ("logits", "hidden_states", ...) to arrays; ``extras`` are the batch arrays ("labels", "mask",
    "segment_ids") and "projection"; ``options`` the term's options (``resolve_options``)."""
    opts = resolve_options(name, options)
    spec = TERMS[name]
    sides = [("student", student)] + ([("teacher", teacher)] if spec.teacher else [])
    args = []
    for side, outputs in sides:
        for key in spec.inputs:
            if outputs is None or key not in outputs or outputs[key] is None:
                raise UserError(f"term {name} needs the {side}'s {key}; request it from the model's forward pass")
            args.append(outputs[key])
    allowed = spec.needs + spec.accepts
    unknown = sorted(k for k in extras if k not in allowed)
    if unknown:
        raise UserError(f"term {name} takes no argument {unknown[0]!r}; it takes: {', '.join(allowed) or 'none'}")
    for key in spec.needs:
        if extras.get(key) is None:
            raise UserError(f"term {name} needs the batch's {key}; pass {key}=...")
    kwargs = {k: v for k, v in extras.items() if v is not None}
    return spec.fn(*args, rows=rows, **kwargs, **opts)


# --------------------------------------------------------------------------------------------------
# Terms in a run config: the ``terms:`` section, checked against the models before anything runs.
# --------------------------------------------------------------------------------------------------

# The model output (``models.layers.EncoderOutput`` field) each term input is read from.
MODEL_OUTPUTS = {"hidden_states": "hidden_states", "attention_probs": "attentions",
                 "attention_scores": "scores", "queries": "queries", "keys": "keys", "values": "values"}
# Terms on logits run in the logits engine (``losses.loss_sums``: gathered rows, chunks, custom
# gradient, the per-shard head reduction), not through ``run_term``: the soft targets as
# ``losses.SoftTarget``, the hard targets as the engine's LM cross-entropy (its "mlm_sum").
LOGIT_TERMS = ("kl", "reverse_kl", "jsd", "logits_mse", "mlm_ce", "clm_ce")
SOFT_TERMS = ("kl", "reverse_kl", "jsd", "logits_mse")
HARD_TERMS = ("mlm_ce", "clm_ce")
MIXTURE_TERMS = ("kl", "reverse_kl", "jsd")  # may name several teachers (a mixture of probabilities)
ROWS = ("all", "masked")
OPTION_FIELDS = ("layers", "layer_reduce", "temperature", "beta", "relation_heads", "relation_weights")


@dataclasses.dataclass(frozen=True)
class TermConfig:
    """One entry of a run config's ``terms:`` list: a loss term added to the ``loss:`` section's.

    kind: a name of ``TERMS``.
    weight: its weight in the total (the total adds ``weight * sum / count``).
    teacher: the teacher(s) it reads, by name (``teacher.name``, default "teacher", or a name of the
      ``teachers:`` list); several (soft targets kl, reverse_kl, jsd only) = a mixture of their
      probabilities with the teachers' weights. Ignored by the hard targets mlm_ce / clm_ce.
    rows: soft targets: "all" (every real token, the reference's L_ce) or "masked" (the masked
      positions only, the reference's --restrict_ce_to_mask); default all.
    projection: a learned linear map of the student's hidden states to the teacher's width (hidden
      terms; trained with the student, not exported), needed when the widths differ.
    layers / layer_reduce / temperature / beta / relation_heads / relation_weights: the term's options
      (``TERMS[kind].options``); null = the term's default; an option the term does not take is an error.
    """

    kind: str
    weight: float = 1.0
    teacher: tuple[str, ...] = ("teacher",)
    rows: str | None = None
    projection: bool = False
    layers: tuple[tuple[int, ...], ...] | None = None
    layer_reduce: str | None = None
    temperature: float | None = None
    beta: float | None = None
    relation_heads: int | None = None
    relation_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.teacher, str):
            object.__setattr__(self, "teacher", (self.teacher,))
        if self.kind not in TERMS:
            raise UserError(f"unknown term kind {self.kind!r}; use one of {', '.join(TERMS)}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise UserError(f"{self.kind}: weight must be >= 0, got {self.weight}")
        if not self.teacher or len(set(self.teacher)) != len(self.teacher):
            raise UserError(f"{self.kind}: teacher must name one teacher or several distinct ones, got "
                            f"{list(self.teacher)}")
        if len(self.teacher) > 1 and self.kind not in MIXTURE_TERMS:
            raise UserError(f"{self.kind} names teachers {list(self.teacher)}; only {', '.join(MIXTURE_TERMS)} "
                            "mix several teachers: name one")
        if self.rows is not None and self.kind not in SOFT_TERMS:
            raise UserError(f"{self.kind} takes no rows option (the soft targets {', '.join(SOFT_TERMS)} do); "
                            "remove rows")
        if self.rows is not None and self.rows not in ROWS:
            raise UserError(f"{self.kind}: rows must be one of {', '.join(ROWS)}, got {self.rows!r}")
        if self.projection and "projection" not in TERMS[self.kind].accepts:
            raise UserError(f"{self.kind} takes no projection (hidden_cos and hidden_mse do); "
                            "remove projection: true")
        resolve_options(self.kind, self.options)

    @staticmethod
    def kinds() -> list[str]:
        return list(TERMS)

    @property
    def options(self) -> dict[str, Any]:
        """The options set (not null), as ``TERMS[kind]`` takes them."""
        return {k: getattr(self, k) for k in OPTION_FIELDS if getattr(self, k) is not None}

    @property
    def on_logits(self) -> bool:
        """Computed by the logits engine (``losses.loss_sums``) rather than by ``run_term``."""
        return self.kind in LOGIT_TERMS

    @property
    def uses_teacher(self) -> bool:
        return TERMS[self.kind].teacher

    def model_outputs(self) -> tuple[str, ...]:
        """The ``encode(..., outputs=...)`` names this term needs (hidden states are always there)."""
        return tuple(MODEL_OUTPUTS[i] for i in TERMS[self.kind].inputs if i in MODEL_OUTPUTS and i != "hidden_states")


def term_names(terms: Sequence[TermConfig]) -> list[str]:
    """The metric name of each term: ``loss_<kind>``, numbered when a kind repeats."""
    kinds = [t.kind for t in terms]
    return [f"loss_{k}" if kinds.count(k) == 1 else f"loss_{k}_{kinds[:i].count(k)}" for i, k in enumerate(kinds)]


def requested_outputs(terms: Sequence[TermConfig], teacher: str | None = None) -> tuple[str, ...]:
    """The model outputs the terms together need from the student (``teacher`` None) or from the
    teacher of that name (for ``encode``)."""
    if teacher is not None:
        terms = [t for t in terms if t.uses_teacher and teacher in t.teacher]
    return tuple(dict.fromkeys(o for t in terms for o in t.model_outputs()))


def term_inputs(encoded: Any) -> dict[str, Any]:
    """A model's ``EncoderOutput`` as the inputs terms read ("hidden_states", "attention_probs", ...)."""
    return {name: getattr(encoded, field) for name, field in MODEL_OUTPUTS.items()}


def run_term(cfg: TermConfig, student: Any, teacher: Any, rows: jax.Array, mask: jax.Array,
             projection: Any = None) -> Sums:
    """One configured term on the student's and teacher's ``EncoderOutput``: rows [B, T] weights,
    mask the [B, 1, T, S] key mask, projection its {kernel, bias} (``projection: true``) or None."""
    extras: dict[str, Any] = {}
    if "mask" in TERMS[cfg.kind].needs:
        extras["mask"] = mask
    if cfg.projection:
        extras["projection"] = projection
    return term_sums(cfg.kind, term_inputs(student), term_inputs(teacher), rows, cfg.options, **extras)
