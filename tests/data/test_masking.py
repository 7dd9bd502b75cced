"""DistilBERT's MLM masking: exact counts, statistics over many batches, never pads or specials."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdistil.data.masking import (
    IGNORE_INDEX,
    MaskingConfig,
    mask_tokens,
    max_masked,
    num_to_mask,
    token_weights_from_counts,
)
from jaxdistil.errors import UserError

V = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL = (PAD, UNK, CLS, SEP, MASK)


def _batches(rng: np.random.Generator, n: int, batch: int, length: int):
    """n random [batch, length] batches: [CLS] ids [SEP] then padding, Zipf-ish ids >= 5."""
    ids = np.full((n, batch, length), PAD, np.int32)
    mask = np.zeros((n, batch, length), np.int32)
    lengths = rng.integers(12, length + 1, size=(n, batch))
    body = np.minimum(rng.zipf(1.3, size=(n, batch, length)) + 4, V - 1).astype(np.int32)
    for i in range(n):
        for b in range(batch):
            L = lengths[i, b]
            ids[i, b, :L] = body[i, b, :L]
            ids[i, b, 0], ids[i, b, L - 1] = CLS, SEP
            mask[i, b, :L] = 1
    return ids, mask


@functools.partial(jax.jit, static_argnames=("cfg",))
def _mask_many(keys, ids, mask, weights, cfg):
    return jax.vmap(lambda k, i, m: mask_tokens(k, i, m, weights, MASK, V, cfg))(keys, ids, mask)


def test_num_to_mask_is_an_exact_ceiling():
    for n in [0, 1, 7, 20, 100, 101, 2_000_001]:
        assert int(num_to_mask(jnp.int32(n), 0.15)) == math.ceil(n * 3 / 20)
    assert int(num_to_mask(jnp.int32(100), 0.15)) == 15  # float32 would give 16
    assert max_masked(4, 100, 0.15) == 60


def test_token_weights_from_counts():
    counts = np.array([5, 0, 1, 8, 1000, 0])
    w = token_weights_from_counts(counts, special_ids=[0, 3], smoothing=0.7)
    assert w.dtype == np.float32 and w[0] == 0 and w[3] == 0
    np.testing.assert_allclose(w[[1, 2, 4, 5]], [1.0, 1.0, 1000**-0.7, 1.0], rtol=1e-6)
    np.testing.assert_allclose(token_weights_from_counts(counts, [], 0.0)[:3], 1.0)


def test_config_is_validated():
    with pytest.raises(UserError, match="sum to 1"):
        MaskingConfig(word_mask=0.5)
    with pytest.raises(UserError, match="mlm_mask_prop"):
        MaskingConfig(mlm_mask_prop=0.0)


@pytest.mark.slow
def test_masking_statistics_over_many_batches():
    cfg = MaskingConfig()
    rng = np.random.default_rng(0)
    n, batch, length = 400, 8, 80
    ids, mask = _batches(rng, n, batch, length)
    counts = np.bincount(ids[mask > 0].ravel(), minlength=V)
    weights = jnp.asarray(token_weights_from_counts(counts, SPECIAL, cfg.mlm_smoothing))
    keys = jax.random.split(jax.random.key(1), n)
    masked, labels = map(np.asarray, _mask_many(keys, jnp.asarray(ids), jnp.asarray(mask), weights, cfg))

    chosen = labels != IGNORE_INDEX
    real = mask.sum(axis=(1, 2))
    # Exactly ceil(0.15 * real tokens) per batch, so the overall fraction is 0.15 (+ rounding).
    np.testing.assert_array_equal(chosen.sum(axis=(1, 2)), np.ceil(real * 0.15 - 1e-9).astype(int))
    frac = chosen.sum() / real.sum()
    assert abs(frac - 0.15) < 0.005, frac
    # Labels are the original ids; unchosen positions are untouched.
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(masked[~chosen], ids[~chosen])
    # Pads and special tokens are never chosen.
    assert not chosen[mask == 0].any()
    assert not np.isin(ids[chosen], SPECIAL).any()
    # 80% [MASK], 10% kept, 10% random (a random draw equal to the original counts as kept: 1/V).
    total = chosen.sum()
    as_mask = (masked[chosen] == MASK).mean()
    kept = (masked[chosen] == ids[chosen]).mean()
    rand = 1 - as_mask - kept
    assert total > 20_000
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(rand - 0.1) < 0.01, (
        as_mask,
        kept,
        rand,
    )
    # Random replacements cover the vocabulary uniformly (including ids never in the data).
    rand_ids = masked[chosen][(masked[chosen] != MASK) & (masked[chosen] != ids[chosen])]
    assert rand_ids.min() < 20 and rand_ids.max() > V - 20


@pytest.mark.slow
def test_rare_tokens_are_chosen_in_the_smoothed_ratio(smoothing=0.7):
    # Two tokens, equally frequent in the batch, with corpus counts 10 and 80: the rare one's
    # weight is 8 ** smoothing times larger. A small mask proportion keeps sampling without
    # replacement from depleting the rare positions, so selection rates follow the weights.
    cfg = MaskingConfig(mlm_mask_prop=0.01, mlm_smoothing=smoothing)
    rare, common = 10, 11
    counts = np.zeros(V)
    counts[rare], counts[common] = 10, 80
    weights = jnp.asarray(token_weights_from_counts(counts, SPECIAL, smoothing))
    n, batch, length = 400, 8, 256
    ids = np.where(np.arange(batch * length).reshape(batch, length) % 2 == 0, rare, common).astype(np.int32)
    ids = np.broadcast_to(ids, (n, batch, length))
    mask = np.ones_like(ids)
    keys = jax.random.split(jax.random.key(2), n)
    _, labels = map(np.asarray, _mask_many(keys, jnp.asarray(ids), jnp.asarray(mask), weights, cfg))
    ratio = (labels == rare).sum() / (labels == common).sum()
    predicted = 8.0**smoothing
    assert abs(ratio / predicted - 1) < 0.08, (ratio, predicted)


def test_fewer_candidates_than_n_chooses_all_candidates():
    # Only 3 maskable tokens: n = ceil(0.15 * 40) = 6 cannot be met; pick all 3, never a special.
    ids = np.full((2, 20), CLS, np.int32)
    ids[0, 5:8] = [50, 60, 70]
    mask = np.ones_like(ids)
    weights = token_weights_from_counts(np.ones(V), SPECIAL)
    _, labels = jax.jit(mask_tokens, static_argnums=(4, 5))(jax.random.key(0), ids, mask, weights, MASK, V)
    labels = np.asarray(labels)
    assert sorted(labels[labels != IGNORE_INDEX].tolist()) == [50, 60, 70]


def test_mask_tokens_jits_and_depends_on_the_key():
    cfg = MaskingConfig()
    ids, mask = _batches(np.random.default_rng(3), 1, 4, 32)
    weights = token_weights_from_counts(np.ones(V), SPECIAL)
    f = jax.jit(mask_tokens, static_argnums=(4, 5, 6))
    a = f(jax.random.key(0), ids[0], mask[0], weights, MASK, V, cfg)
    b = f(jax.random.key(0), ids[0], mask[0], weights, MASK, V, cfg)
    c = f(jax.random.key(1), ids[0], mask[0], weights, MASK, V, cfg)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert a[0].dtype == jnp.int32 and a[1].shape == ids[0].shape


def torch_prepare_batch_mlm(torch, token_ids, lengths, token_probs, pred_probs, mask_id, vocab, pad_id, gen):
    """distiller.py's prepare_batch_mlm (fp32, no fp16 rounding), seeded through ``gen``."""
    attn_mask = torch.arange(token_ids.size(1))[None] < lengths[:, None]
    bs, max_seq_len = token_ids.size()
    mlm_labels = token_ids.clone()
    x_prob = token_probs[token_ids.flatten()]
    n_tgt = math.ceil(0.15 * lengths.sum().item())
    tgt_ids = torch.multinomial(x_prob / x_prob.sum(), n_tgt, replacement=False, generator=gen)
    pred_mask = torch.zeros(bs * max_seq_len, dtype=torch.bool)
    pred_mask[tgt_ids] = True
    pred_mask = pred_mask.view(bs, max_seq_len)
    pred_mask[token_ids == pad_id] = False
    real = token_ids[pred_mask]
    rand = real.clone().random_(vocab, generator=gen)
    masked = real.clone().fill_(mask_id)
    probs = torch.multinomial(pred_probs, len(real), replacement=True, generator=gen)
    new = masked * (probs == 0).long() + real * (probs == 1).long() + rand * (probs == 2).long()
    token_ids = token_ids.masked_scatter(pred_mask, new)
    mlm_labels[~pred_mask] = -100
    return token_ids, attn_mask, mlm_labels


def test_rare_token_ratio_at_15_percent_equals_the_reference():
    """At the recipe's 15% (where sampling without replacement depletes the rare positions, so the
    ratio is not the weights' ratio), jaxdistil's masking picks rare vs common tokens in the same
    proportion as the reference's torch.multinomial, over many batches; and the 80/10/10 split."""
    torch = pytest.importorskip("torch")
    smoothing = 0.7
    cfg = MaskingConfig(mlm_smoothing=smoothing)
    rare, common = 10, 11
    counts = np.ones(V)
    counts[rare], counts[common] = 10, 1000
    weights = token_weights_from_counts(counts, SPECIAL, smoothing)
    n, batch, length = 1000, 4, 64
    rng = np.random.default_rng(5)
    ids = np.where(rng.random((n, batch, length)) < 0.03, rare, common).astype(np.int32)
    lengths = rng.integers(40, length + 1, (n, batch))
    mask = (np.arange(length)[None, None] < lengths[..., None]).astype(np.int32)
    ids = np.where(mask > 0, ids, PAD).astype(np.int32)
    keys = jax.random.split(jax.random.key(7), n)
    masked, labels = map(np.asarray, _mask_many(keys, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(weights), cfg))

    gen = torch.Generator().manual_seed(0)
    t_probs = torch.as_tensor(weights, dtype=torch.float32)
    pred = torch.tensor([0.8, 0.1, 0.1])
    t_labels, t_masked = [], []
    for i in range(n):
        out_ids, _, lab = torch_prepare_batch_mlm(torch, torch.as_tensor(ids[i], dtype=torch.long),
                                                  torch.as_tensor(lengths[i]), t_probs, pred, MASK, V, PAD, gen)
        t_labels.append(lab.numpy())
        t_masked.append(out_ids.numpy())
    t_labels, t_masked = np.stack(t_labels), np.stack(t_masked)

    # Same number of positions per batch (the reference's ceil over the batch's real tokens).
    np.testing.assert_array_equal((labels != IGNORE_INDEX).sum(axis=(1, 2)), (t_labels != -100).sum(axis=(1, 2)))

    def ratio(lab):
        return (lab == rare).sum() / (lab == common).sum()

    ours, theirs = ratio(labels), ratio(t_labels)
    naive = (counts[common] / counts[rare]) ** smoothing * (ids == rare).sum() / (ids == common).sum()
    assert abs(ours / theirs - 1) < 0.06, (ours, theirs)
    assert theirs < 0.6 * naive  # depletion matters here: a sampler with replacement would fail
    for got_ids, got_lab in ((masked, labels), (t_masked, t_labels)):
        chosen = got_lab != IGNORE_INDEX
        as_mask = (got_ids[chosen] == MASK).mean()
        kept = (got_ids[chosen] == ids[chosen]).mean()
        assert abs(as_mask - 0.8) < 0.015 and abs(kept - 0.1) < 0.015, (as_mask, kept)
