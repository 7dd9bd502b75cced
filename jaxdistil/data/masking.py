"""DistilBERT's dynamic MLM masking, on device inside the jitted step.

The reference (``distiller.py: prepare_batch_mlm``) picks, per batch, ``n = ceil(p * real tokens)``
positions by a multinomial *without replacement* over the flattened batch, with weights
``token_weight[id] * attention_mask``, then replaces 80% of them by ``[MASK]``, 10% by a uniformly
random token, and keeps 10%. Token weights are ``max(count, 1) ** -smoothing`` (rare tokens are
masked more often) and 0 for special tokens.

Sampling without replacement proportional to weights is the Gumbel top-k trick: add independent
Gumbel noise to ``log w`` and keep the ``n`` largest keys (Plackett-Luce). ``n`` depends on the
batch, but ``jax.lax.top_k`` needs a static ``k``, so we take the static upper bound
``k = ceil(p * B * T)`` and keep the entries whose rank is below ``n``. Shapes stay static, so the
step compiles once per bucket shape.

Shapes: B batch, T sequence length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistil.errors import UserError

IGNORE_INDEX = -100  # label of positions that were not chosen (PyTorch's CrossEntropy ignore_index)


@dataclasses.dataclass(frozen=True)
class MaskingConfig:
    """MLM masking knobs (the reference's defaults).

    mlm_mask_prop: fraction of a batch's real tokens that get a label.
    word_mask / word_keep / word_rand: of those, the fractions replaced by [MASK], kept, randomised.
    mlm_smoothing: exponent of the frequency smoothing; token weight = max(count, 1) ** -smoothing.
    """

    mlm_mask_prop: float = 0.15
    word_mask: float = 0.8
    word_keep: float = 0.1
    word_rand: float = 0.1
    mlm_smoothing: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 < self.mlm_mask_prop <= 1.0:
            raise UserError(f"mlm_mask_prop must be in (0, 1], got {self.mlm_mask_prop}")
        probs = (self.word_mask, self.word_keep, self.word_rand)
        if min(probs) < 0 or abs(sum(probs) - 1.0) > 1e-6:
            raise UserError(
                f"word_mask + word_keep + word_rand must be non-negative and sum to 1, got {probs}"
            )
        if self.mlm_smoothing < 0:
            raise UserError(f"mlm_smoothing must be >= 0, got {self.mlm_smoothing}")


def token_weights_from_counts(
    counts: np.ndarray, special_ids: Iterable[int], smoothing: float = 0.7
) -> np.ndarray:
    """Masking weight per vocabulary entry: ``max(count, 1) ** -smoothing``, 0 for special tokens.

    counts: [V] occurrences of each token id in the training corpus.
    Returns float32 [V]; pass it (as a device array) to ``mask_tokens``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1:
        raise UserError(f"token counts must be a 1-D array over the vocabulary, got shape {counts.shape}")
    weights = np.maximum(counts, 1.0) ** -float(smoothing)
    for idx in special_ids:
        if idx is not None and 0 <= int(idx) < weights.shape[0]:
            weights[int(idx)] = 0.0
    return weights.astype(np.float32)


def num_to_mask(n_real: jax.Array, prop: float) -> jax.Array:
    """``ceil(prop * n_real)`` in exact integer arithmetic (int32 scalar).

    Float32 would round e.g. 0.15 * 100 to 15.000001 and mask one token too many; writing ``prop``
    as a fraction a/b (b <= 1000) and splitting ``n_real = q*b + r`` keeps every product in int32.
    """
    frac = Fraction(prop).limit_denominator(1000)
    a, b = frac.numerator, frac.denominator
    n_real = n_real.astype(jnp.int32)
    q, r = n_real // b, n_real % b
    return q * a + (r * a + b - 1) // b


def max_masked(batch: int, length: int, prop: float) -> int:
    """Static upper bound on the number of chosen positions in a [batch, length] batch."""
    frac = Fraction(prop).limit_denominator(1000)
    return min(batch * length, math.ceil(batch * length * frac.numerator / frac.denominator))


def select_positions(rng: jax.Array, weights: jax.Array, n: jax.Array, k: int) -> jax.Array:
    """Choose ``n`` positions without replacement, with probability proportional to ``weights``.

    weights: [B, T] non-negative (0 = never chosen); n: int32 scalar (dynamic), k: static bound >= n.
    Returns bool [B, T]. Fewer than ``n`` positions are chosen only when fewer have positive weight.
    """
    shape = weights.shape
    flat = weights.reshape(-1).astype(jnp.float32)
    gumbel = jax.random.gumbel(rng, flat.shape, jnp.float32)
    keys = jnp.where(flat > 0, jnp.log(jnp.where(flat > 0, flat, 1.0)) + gumbel, -jnp.inf)
    top_keys, top_idx = jax.lax.top_k(keys, k)
    keep = (jnp.arange(k) < n) & jnp.isfinite(top_keys)
    chosen = jnp.zeros(flat.shape, jnp.bool_).at[top_idx].set(keep)
    return chosen.reshape(shape)


def mask_tokens(
    rng: jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_weights: jax.Array,
    mask_id: int,
    vocab_size: int,
    cfg: MaskingConfig = MaskingConfig(),
) -> tuple[jax.Array, jax.Array]:
    """Dynamic MLM masking of one batch (jit-able; ``mask_id``, ``vocab_size``, ``cfg`` static).

    rng: PRNG key for this step.
    input_ids: [B, T] int32; attention_mask: [B, T] (1 = real token, 0 = pad);
    token_weights: [V] float32 from ``token_weights_from_counts`` (0 for special tokens).
    Returns (masked_ids [B, T] int32, labels [B, T] int32 with the original id at chosen positions
    and -100 elsewhere).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    real = jnp.asarray(attention_mask) > 0
    batch, length = input_ids.shape
    n = num_to_mask(real.sum(), cfg.mlm_mask_prop)
    k = max_masked(batch, length, cfg.mlm_mask_prop)

    k_select, k_action, k_rand = jax.random.split(rng, 3)
    weights = jnp.where(real, jnp.asarray(token_weights, jnp.float32)[input_ids], 0.0)
    chosen = select_positions(k_select, weights, n, k)

    # Each chosen position independently becomes [MASK] / itself / a random token (as the reference
    # does with a multinomial with replacement), so the choice is independent of the token's weight.
    probs = jnp.asarray([cfg.word_mask, cfg.word_keep, cfg.word_rand], jnp.float32)
    action = jax.random.categorical(k_action, jnp.log(probs), shape=(batch, length))
    random_ids = jax.random.randint(k_rand, (batch, length), 0, vocab_size, jnp.int32)
    replacement = jnp.select(
        [action == 0, action == 1], [jnp.full_like(input_ids, mask_id), input_ids], random_ids
    )
    masked_ids = jnp.where(chosen, replacement, input_ids)
    labels = jnp.where(chosen, input_ids, IGNORE_INDEX)
    return masked_ids, labels


def causal_labels(input_ids: jax.Array, attention_mask: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
    """Next-token labels for causal-LM training (GPT-2), aligned with the logits: [B, T] int32.

    ``labels[:, t] = input_ids[:, t + 1]`` where positions t and t + 1 are both real tokens (and, for
    packed rows, of the same non-padding segment); IGNORE_INDEX elsewhere, and at the last position. The loss on
    these labels is the reference's ``cross_entropy(logits[:, :-1], lm_labels[:, 1:])`` with
    ``lm_labels`` = ids, -100 at padding; kept at full length so every loss sees [B, T] rows.
    """
    ids = jnp.asarray(input_ids).astype(jnp.int32)
    real = jnp.asarray(attention_mask).astype(bool)
    nxt = jnp.roll(ids, -1, axis=1)
    ok = real & jnp.roll(real, -1, axis=1)
    if segment_ids is not None:
        seg = jnp.asarray(segment_ids)
        ok = ok & (seg > 0) & (seg == jnp.roll(seg, -1, axis=1))  # segment 0 is padding
    ok = ok.at[:, -1].set(False)
    return jnp.where(ok, nxt, IGNORE_INDEX).astype(jnp.int32)
