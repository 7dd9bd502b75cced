"""The distillation triple loss (L_ce + L_mlm + L_cos, optional L_mse) with the reference's semantics.

Reference (Hugging Face ``distillation/distiller.py``), for one batch:

  L_ce  = T^2 * mean over CE rows of KL(softmax(t/T) || softmax(s/T))   (kl_div "batchmean")
          CE rows = attention-mask positions, or only the masked positions with restrict_ce_to_mask;
  L_mlm = mean over masked positions (labels != -100) of cross_entropy(s, label);
  L_cos = mean over attention-mask positions of 1 - cos(student last hidden, teacher last hidden);
  L_mse = sum over CE rows and vocab of (s - t)^2 / number of CE rows     (only if alpha_mse > 0);
  total = alpha_ce L_ce + alpha_mlm L_mlm + alpha_cos L_cos + alpha_mse L_mse.

s, t are the student/teacher logits [rows, V]. Every softmax / log-softmax / KL / cross-entropy
runs in float32, whatever dtype the heads compute in.

Interface (see notes/contract.md): ``loss_sums`` returns float32 scalar SUMS and row COUNTS, so
micro-batches and devices aggregate exactly; ``combine_losses`` divides once at the end.
``loss_counts`` gives the counts alone (they only depend on labels and attention mask).

Memory. The logits are the largest tensors of the step ([B*T, V] with V = 30522, per model), so
``loss_sums`` starts from hidden states and calls the heads itself, on as few rows at a time as
possible:
  * rows selection first: when only masked rows matter (restrict_ce_to_mask, or MLM-only mode) and
    the caller gives ``max_rows`` (a static upper bound on the number of masked positions), the
    masked rows of the hidden states are gathered into [max_rows, D] BEFORE the heads, so the
    logits are [max_rows, V]; unused slots get weight 0. If a batch ever has more masked rows than
    ``max_rows`` a ``lax.cond`` falls back to the all-rows path, so the numbers are always exact;
  * chunking: otherwise the rows are processed ``cfg.chunk_rows`` at a time in a ``lax.scan``,
    each chunk under ``jax.checkpoint``; the backward pass recomputes a chunk's logits instead of
    keeping [B*T, V] residuals alive between the forward and backward passes. The cost is one more
    forward of both heads, on each chunk, in the backward pass (none when all rows fit one chunk);
  * on a block of logits, a custom VJP keeps only the logits as residuals and forms the gradient
    with respect to the student logits in one fused expression (see ``_logit_sums``).
Collectives. Under a mesh the rows are laid out as [S, N/S] blocks, one per batch shard (data x
fsdp), and the student head runs on per-shard copies of its parameters under ``vmap``: each
device accumulates the head's weight gradient over all its chunks, and the shards' gradients are
reduced once after the loop, not once per chunk (``_blocked_sums``).
The plain functions (``ce_loss``, ``mlm_loss``, ``cos_loss``, ``mse_loss``, ``plain_loss_sums``)
take full logits and read as the specification; the tests check the two agree.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxdistil.data.masking import IGNORE_INDEX
from jaxdistil.errors import UserError
from jaxdistil.training.sharding import BATCH_AXES

Head = Callable[[jax.Array], jax.Array]  # hidden [N, D] -> logits [N, V]
# torch.nn.functional.cosine_embedding_loss adds this to each squared norm (ATen's EPSILON).
COS_EPS = 1e-12

SUM_KEYS = ("ce_sum", "mlm_sum", "cos_sum", "mse_sum", "mlm_correct")
COUNT_KEYS = ("ce_rows", "mlm_rows", "cos_rows")
NORMALIZE = ("batch", "group")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and knobs of the distillation loss (defaults: DistilBERT's recipe).

    temperature:         T of the soft targets; L_ce is scaled by T^2 as in the reference.
    alpha_ce/mlm/cos/mse: weights of the four terms in the total; alpha_mse = 0 skips L_mse.
    alpha_clm:           weight of L_clm, the next-token cross-entropy of causal LMs (GPT-2), which
                         takes the place of L_mlm (one of the two is 0, as the reference asserts).
                         The sums carry it in the MLM slot ("mlm_sum": the LM cross-entropy over the
                         labelled rows, masked or next-token); the metrics add "loss_clm".
    cos_projection:      "none": L_cos needs equal widths; "linear": a learned projection (kernel
                         [D_student, D_teacher] + bias, trained with the student, not exported)
                         maps the student's last hidden states to the teacher's width first.
    restrict_ce_to_mask: L_ce (and L_mse) only over the masked positions instead of all tokens.
    chunk_rows:          token rows whose logits are materialised at once (None = all rows at once,
                         no recomputation). Larger is faster (bigger matmuls, no recompute when
                         all rows fit), smaller uses less memory: a chunk holds a few
                         [chunk_rows, V] float32 buffers (2048 x 30522 x 4 B = 250 MB each).
    normalize:           "batch": every loss is a mean over the rows of the whole batch (update),
                         masked once: the gradient of one large batch, whatever the accumulation.
                         "group": the reference's; the batch is groups of ``group_rows`` rows (the
                         step's, from ``loader.group_rows``), each masked on its own and averaged on
                         its own, and the loss is the average over groups, as the reference's
                         gradient accumulation over per-GPU micro-batches and DDP compute it.
    """

    temperature: float = 2.0
    alpha_ce: float = 5.0
    alpha_mlm: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0
    alpha_clm: float = 0.0
    restrict_ce_to_mask: bool = False
    chunk_rows: int | None = 2048
    normalize: str = "batch"
    cos_projection: str = "none"

    def __post_init__(self):
        if self.normalize not in NORMALIZE:
            raise UserError(f"loss.normalize must be one of {', '.join(NORMALIZE)}, got {self.normalize!r}")
        if not self.temperature > 0:
            raise UserError(f"loss.temperature must be > 0, got {self.temperature}; set e.g. temperature=2.0")
        if self.cos_projection not in COS_PROJECTIONS:
            raise UserError(f"loss.cos_projection must be one of {', '.join(COS_PROJECTIONS)}, "
                            f"got {self.cos_projection!r}")
        if self.alpha_mlm > 0 and self.alpha_clm > 0:
            raise UserError("loss.alpha_mlm and loss.alpha_clm are both > 0; a masked LM trains with "
                            "alpha_mlm, a causal LM (GPT-2) with alpha_clm: set the other to 0")
        for name in ("alpha_ce", "alpha_mlm", "alpha_cos", "alpha_mse", "alpha_clm"):
            value = getattr(self, name)
            if not value >= 0:
                raise UserError(f"loss.{name} must be >= 0, got {value}; use 0 to switch the term off")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise UserError(
                f"loss.chunk_rows must be a positive number of rows or null, got {self.chunk_rows}")


COS_PROJECTIONS = ("none", "linear")


def max_masked_rows(batch: int, length: int, mlm_mask_prop: float, masked_batch: int | None = None) -> int:
    """Static bound on the masked positions of a [batch, length] (micro-)batch, for ``max_rows``.

    Masking picks ceil(mlm_mask_prop * real tokens) <= ceil(mlm_mask_prop * batch * length)
    positions of the batch it is given (+1 absorbs float rounding differences with the masking
    code). With gradient accumulation the masking runs on the whole batch of ``masked_batch``
    sequences and this [batch, length] slice gets a random share of the draws, which can exceed its
    proportional part: then pass ``masked_batch`` and the bound gets a margin of 4 standard
    deviations (about 4 sqrt(mean)), so that the rare overflow (which ``loss_sums`` still computes
    exactly, through its all-rows path) stays rare.
    """
    rows = batch * length
    mean = mlm_mask_prop * rows
    bound = math.ceil(mean) + 1
    if masked_batch is not None and masked_batch > batch:
        bound = math.ceil(mean + 4.0 * math.sqrt(mean)) + 2
    return min(rows, bound)


# --------------------------------------------------------------------------------------------------
# Per-row primitives (float32). Shapes: s, t [..., V]; results [...].
# --------------------------------------------------------------------------------------------------


def _f32(x: jax.Array) -> jax.Array:
    """At least float32: bf16/fp16 logits are upcast, float64 (gradient checks) is kept."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def kl_per_row(s_logits: jax.Array, t_logits: jax.Array, temperature: float) -> jax.Array:
    """KL(softmax(t/T) || softmax(s/T)) summed over the vocab: [..., V] x2 -> [...] float32.

    Same as torch ``kl_div(log_softmax(s/T), softmax(t/T), reduction="none").sum(-1)`` (x log x
    = 0 at x = 0).
    """
    log_q = jax.nn.log_softmax(_f32(s_logits) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(_f32(t_logits) / temperature, axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def xent_per_row(s_logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy and correctness per row: logits [..., V], labels [...] (-100 = ignored).

    Returns (loss [...] float32, 0 where ignored; correct [...] float32, argmax == label).
    """
    logits = _f32(s_logits)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    loss = jnp.where(valid, lse - picked, 0.0)
    correct = valid & (jnp.argmax(logits, axis=-1) == safe)
    return loss, correct.astype(jnp.float32)


def sq_err_per_row(s_logits: jax.Array, t_logits: jax.Array) -> jax.Array:
    """Sum over the vocab of (s - t)^2: [..., V] x2 -> [...] float32."""
    d = _f32(s_logits) - _f32(t_logits)
    return jnp.sum(d * d, axis=-1)


def one_minus_cos_per_row(s_hidden: jax.Array, t_hidden: jax.Array) -> jax.Array:
    """1 - cos(s, t) per row as torch's cosine_embedding_loss (target 1): [..., D] x2 -> [...]."""
    s = _f32(s_hidden)
    t = _f32(t_hidden)
    dot = jnp.sum(s * t, axis=-1)
    denom = jnp.sqrt((jnp.sum(s * s, axis=-1) + COS_EPS) * (jnp.sum(t * t, axis=-1) + COS_EPS))
    return 1.0 - dot / denom


# --------------------------------------------------------------------------------------------------
# Plain losses on full logits: the specification (and what the tests compare against).
# --------------------------------------------------------------------------------------------------


def _mean_over(values: jax.Array, rows: jax.Array) -> jax.Array:
    w = rows.astype(jnp.float32)
    return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1.0)


def ce_loss(s_logits: jax.Array, t_logits: jax.Array, rows: jax.Array, temperature: float) -> jax.Array:
    """L_ce: logits [B, T, V] x2, rows [B, T] (selected positions) -> T^2 * mean KL, scalar."""
    return _mean_over(kl_per_row(s_logits, t_logits, temperature), rows) * temperature**2


def mlm_loss(s_logits: jax.Array, labels: jax.Array) -> jax.Array:
    """L_mlm: logits [B, T, V], labels [B, T] (-100 = ignored) -> mean cross-entropy, scalar."""
    loss, _ = xent_per_row(s_logits, labels)
    return _mean_over(loss, labels != IGNORE_INDEX)


def cos_loss(s_hidden: jax.Array, t_hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """L_cos: hidden [B, T, D] x2, attention_mask [B, T] -> mean of 1 - cos over real tokens."""
    return _mean_over(one_minus_cos_per_row(s_hidden, t_hidden), attention_mask)


def mse_loss(s_logits: jax.Array, t_logits: jax.Array, rows: jax.Array) -> jax.Array:
    """L_mse: logits [B, T, V] x2, rows [B, T] -> sum of squared differences / number of rows."""
    return _mean_over(sq_err_per_row(s_logits, t_logits), rows)


def _ce_row_mask(labels: jax.Array, attention_mask: jax.Array, cfg: LossConfig) -> jax.Array:
    """Boolean [B, T]: the rows L_ce and L_mse average over."""
    if cfg.restrict_ce_to_mask:
        return labels != IGNORE_INDEX
    return attention_mask.astype(bool)


def loss_masks(labels: jax.Array, attention_mask: jax.Array, cfg: LossConfig) -> dict[str, jax.Array]:
    """Boolean [B, T] masks of the rows each loss averages over: "ce" (L_ce and L_mse), "mlm" (the
    masked positions) and "cos" (real tokens)."""
    return {"ce": _ce_row_mask(labels, attention_mask, cfg), "mlm": labels != IGNORE_INDEX,
            "cos": attention_mask.astype(bool)}


def loss_counts(labels: jax.Array, attention_mask: jax.Array, cfg: LossConfig) -> dict[str, jax.Array]:
    """Row counts (float32 scalars) of a batch: labels [B, T] (-100 = not masked), attention_mask [B, T].

    "ce_rows": rows of L_ce / L_mse; "mlm_rows": masked positions; "cos_rows": real tokens.
    They need no forward pass, so a step can compute loss weights before it.
    """
    masks = loss_masks(labels, attention_mask, cfg)
    return {f"{k}_rows": jnp.sum(m, dtype=jnp.float32) for k, m in masks.items()}


def loss_weights(
    labels: jax.Array, attention_mask: jax.Array, cfg: LossConfig, group_rows: int = 0
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Row weights of each loss and the denominators of their means, before any forward pass.

    labels, attention_mask: [B, T] of the whole (masked) batch.
    Returns (weights {"ce", "mlm", "cos"} float32 [B, T], counts): the step's loss is
    ``sum(weight * per-row loss) / counts[<loss>_rows]`` for each term (``combine_losses``).
      normalize="batch": weight 1 on a loss's rows and the count of those rows in the batch: a mean
        over the whole batch (what one large batch gives).
      normalize="group": rows [i g, (i+1) g) are group i (g = group_rows, the reference's per-GPU
        micro-batch); weight 1 / (that loss's rows in the group) and, as denominator, the number of
        groups holding such rows: the average over groups of the groups' means, as the reference's
        ``loss / gradient_accumulation_steps`` summed over micro-batches, averaged by DDP.
    counts["masked"] is always the number of masked positions (the accuracy's denominator), and
    counts["tokens"] the number of real tokens.
    """
    masks = loss_masks(labels, attention_mask, cfg)
    counts = {f"{k}_rows": jnp.sum(m, dtype=jnp.float32) for k, m in masks.items()}
    counts["masked"] = counts["mlm_rows"]  # masked positions, whatever the normalisation
    counts["tokens"] = counts["cos_rows"]  # real tokens, whatever the normalisation
    if cfg.normalize == "batch":
        return {k: m.astype(jnp.float32) for k, m in masks.items()}, counts
    batch, length = labels.shape
    if group_rows < 1 or batch % group_rows:
        raise UserError(f"loss.normalize=group needs groups that split the batch of {batch} rows "
                        f"(loader.group_rows={group_rows}); set loader.group_rows to a divisor of it, e.g. 5")
    weights = {}
    for key, m in masks.items():
        per_group = m.reshape(batch // group_rows, group_rows * length).astype(jnp.float32)
        in_group = jnp.sum(per_group, axis=1, keepdims=True)  # [G, 1]
        weights[key] = (per_group / jnp.maximum(in_group, 1.0)).reshape(batch, length)
        counts[f"{key}_rows"] = jnp.sum(in_group > 0, dtype=jnp.float32)
    return weights, counts


def plain_loss_sums(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array | None,
    student_head: Head,
    teacher_head: Head | None,
    labels: jax.Array,
    attention_mask: jax.Array,
    cfg: LossConfig,
    weights: dict[str, jax.Array] | None = None,
    cos_hidden: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """``loss_sums`` computed the obvious way: both heads on all B*T rows at once ([B, T, V] logits).

    Reference for the tests and readable as the specification; do not use at scale.
    """
    b, t, d = student_hidden.shape
    if weights is None:
        weights, _ = loss_weights(labels, attention_mask, cfg)
    s_logits = student_head(student_hidden.reshape(b * t, d)).reshape(b, t, -1)
    mlm, correct = xent_per_row(s_logits, labels)
    out = loss_counts(labels, attention_mask, cfg)
    zero = jnp.zeros((), jnp.float32)
    out.update(mlm_sum=jnp.sum(mlm * weights["mlm"]), mlm_correct=jnp.sum(correct), ce_sum=zero,
               cos_sum=zero, mse_sum=zero)
    if teacher_hidden is None:
        return out
    teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
    t_logits = jax.lax.stop_gradient(teacher_head(teacher_hidden.reshape(b * t, -1)).reshape(b, t, -1))
    rows = weights["ce"]
    out["ce_sum"] = jnp.sum(kl_per_row(s_logits, t_logits, cfg.temperature) * rows) * cfg.temperature**2
    if cfg.alpha_mse > 0:
        out["mse_sum"] = jnp.sum(sq_err_per_row(s_logits, t_logits) * rows)
    cos_in = student_hidden if cos_hidden is None else cos_hidden
    if cos_in.shape == teacher_hidden.shape:
        out["cos_sum"] = jnp.sum(one_minus_cos_per_row(cos_in, teacher_hidden) * weights["cos"])
    return out


# --------------------------------------------------------------------------------------------------
# Memory-efficient sums: gathered rows and/or chunks with recomputation.
# --------------------------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _logit_sums(s_logits, t_logits, labels, ce_w, mlm_w, temperature: float, with_mse: bool):
    """Sums over a block of logits: s [n, V], t [n, V] or None, labels [n], row weights ce_w, mlm_w
    [n] -> 4 scalars.

    Returns (sum ce_w KL (no T^2), sum mlm_w CE over labelled rows, sum ce_w squared error, correct
    count).
    Same numbers as the per-row primitives, with a hand-written backward pass: the residuals are
    the logits themselves (in their compute dtype), and the gradient with respect to the student
    logits is one fused expression,
      g_ce * w * (softmax(s/T) - softmax(t/T)) / T + g_mlm * m * (softmax(s) - onehot) + g_mse * w * 2 (s - t),
    instead of autodiff's chain of [n, V] float32 intermediates (w = ce_w, m = mlm_w). The teacher
    gets no gradient.
    """
    return _logit_sums_fwd(s_logits, t_logits, labels, ce_w, mlm_w, temperature, with_mse)[0]


def _logit_sums_fwd(s_logits, t_logits, labels, ce_w, mlm_w, temperature, with_mse):
    s = _f32(s_logits)
    valid = labels != IGNORE_INDEX
    safe = jnp.where(valid, labels, 0)
    # One row max serves both student log-softmaxes: max(s/T) = max(s)/T for T > 0.
    shifted = s - jnp.max(s, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    picked = jnp.take_along_axis(shifted, safe[:, None], axis=-1)[:, 0]
    mlm = jnp.sum(jnp.where(valid, (lse - picked) * mlm_w, 0.0))
    correct = jnp.sum(valid & (jnp.argmax(s, axis=-1) == safe), dtype=s.dtype)
    ce = mse = jnp.zeros((), s.dtype)
    if t_logits is not None:
        log_q = jax.nn.log_softmax(shifted / temperature, axis=-1)
        log_p = jax.nn.log_softmax(_f32(t_logits) / temperature, axis=-1)
        p = jnp.exp(log_p)
        kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
        ce = jnp.sum(kl * ce_w)
        if with_mse:
            mse = jnp.sum(sq_err_per_row(s, t_logits) * ce_w)
    return (ce, mlm, mse, correct), (s_logits, t_logits, labels, ce_w, mlm_w)


def _logit_sums_bwd(temperature, with_mse, res, g):
    s_logits, t_logits, labels, ce_w, mlm_w = res
    g_ce, g_mlm, g_mse, _ = g
    s = _f32(s_logits)
    valid = labels != IGNORE_INDEX
    vocab_ids = jnp.arange(s.shape[-1])
    onehot = (vocab_ids[None, :] == labels[:, None]).astype(s.dtype)  # all-zero rows when label = -100
    m = jnp.where(valid, mlm_w, 0.0).astype(s.dtype)
    ds = (g_mlm * m)[:, None] * (jax.nn.softmax(s, axis=-1) - onehot)
    if t_logits is not None:
        t = _f32(t_logits)
        w = ce_w.astype(s.dtype)[:, None]
        q = jax.nn.softmax(s / temperature, axis=-1)
        p = jax.nn.softmax(t / temperature, axis=-1)
        ds = ds + (g_ce / temperature) * w * (q - p)
        if with_mse:
            ds = ds + (2.0 * g_mse) * w * (s - t)
    # None = zero cotangent: the teacher, the labels and the row weights get no gradient.
    return ds.astype(s_logits.dtype), None, None, None, None


_logit_sums.defvjp(_logit_sums_fwd, _logit_sums_bwd)


SOFT_KINDS = ("kl", "reverse_kl", "jsd", "logits_mse")
SOFT_ROWS = ("all", "masked")


@dataclasses.dataclass(frozen=True)
class SoftTarget:
    """A soft-target term of the logits engine beside the loss section's L_ce / L_mse (the run
    config's logit ``terms:``; formulas in ``jaxdistil.distill.terms``).

    kind: "kl" (T^2 KL(P || Q)), "reverse_kl" (T^2 KL(Q || P)), "jsd" (T^2 JSD_beta) or "logits_mse".
    teachers: indices into the teacher tuple ``loss_sums`` is given; several = a mixture of their
      probabilities at temperature T, P = sum_k mixture_k softmax(t_k / T) (weights summing to 1).
    rows: "all" (every real token, weights ``weights["cos"]``) or "masked" (the masked positions,
      ``weights["mlm"]``).
    """

    kind: str
    teachers: tuple[int, ...] = (0,)
    mixture: tuple[float, ...] = (1.0,)
    temperature: float = 2.0
    beta: float = 0.5
    rows: str = "all"

    def __post_init__(self) -> None:
        if self.kind not in SOFT_KINDS:
            raise UserError(f"soft target {self.kind!r} is not one of {', '.join(SOFT_KINDS)}")
        if self.rows not in SOFT_ROWS:
            raise UserError(f"{self.kind}: rows must be one of {', '.join(SOFT_ROWS)}, got {self.rows!r}")
        if len(self.teachers) != len(self.mixture) or not self.teachers:
            raise UserError(f"{self.kind}: one mixture weight per teacher, got {self.teachers} and {self.mixture}")
        if self.kind == "logits_mse" and len(self.teachers) > 1:
            raise UserError("logits_mse compares the student's logits with ONE teacher's; name one teacher")

    @property
    def scale(self) -> float:
        """T^2 for the divergences (the reference's L_ce scaling), 1 for logits_mse."""
        return 1.0 if self.kind == "logits_mse" else float(self.temperature) ** 2


def soft_per_row(spec: SoftTarget, s_logits: jax.Array, t_logits: tuple) -> jax.Array:
    """The term per row, without the T^2 scale: s [n, V], t_logits a tuple of teacher logits [n, V]
    (indexed by ``spec.teachers``) -> [n] float32."""
    if spec.kind == "logits_mse":
        return sq_err_per_row(s_logits, t_logits[spec.teachers[0]])
    temp = float(spec.temperature)
    log_q = jax.nn.log_softmax(_f32(s_logits) / temp, axis=-1)
    logs = [jax.nn.log_softmax(_f32(t_logits[i]) / temp, axis=-1) for i in spec.teachers]
    if len(logs) == 1:
        log_p = logs[0]
    else:  # log sum_k w_k p_k, in log space
        log_p = jax.nn.logsumexp(jnp.stack([lp + math.log(w) for lp, w in zip(logs, spec.mixture)]), axis=0)

    def kl_of(log_a, log_b):  # KL(A || B) per row, A log A = 0 where A = 0
        a = jnp.exp(log_a)
        return jnp.sum(jnp.where(a > 0, a * (log_a - log_b), 0.0), axis=-1)

    if spec.kind == "kl":
        return kl_of(log_p, log_q)
    if spec.kind == "reverse_kl":
        return kl_of(log_q, log_p)
    beta = float(spec.beta)
    log_m = jnp.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * kl_of(log_p, log_m) + (1.0 - beta) * kl_of(log_q, log_m)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _soft_sums(s_logits, t_logits, weights, specs):
    """(sum_rows weight_i * term_i per row, ...) over a block: s [n, V], t_logits a tuple of [n, V]
    (None where unused), weights a tuple of [n], one per spec. The backward pass keeps only the
    logits and recomputes the rows' terms to differentiate them (the teachers get no gradient)."""
    return _soft_sums_plain(s_logits, t_logits, weights, specs)


def _soft_sums_plain(s_logits, t_logits, weights, specs):
    return tuple(jnp.sum(soft_per_row(spec, s_logits, t_logits) * w) for spec, w in zip(specs, weights))


def _soft_sums_fwd(s_logits, t_logits, weights, specs):
    return _soft_sums(s_logits, t_logits, weights, specs), (s_logits, t_logits, weights)


def _soft_sums_bwd(specs, res, g):
    s_logits, t_logits, weights = res
    _, vjp = jax.vjp(lambda s: _soft_sums_plain(s, t_logits, weights, specs), s_logits)
    (ds,) = vjp(tuple(g))
    return ds, jax.tree.map(jnp.zeros_like, t_logits), jax.tree.map(jnp.zeros_like, weights)


_soft_sums.defvjp(_soft_sums_fwd, _soft_sums_bwd)


def _chunking(n: int, chunk_rows: int) -> tuple[int, int]:
    """(number of chunks, rows per chunk) covering n rows with chunks of at most chunk_rows.

    Prefers a divisor of n (B*T usually has many) so no padding rows are needed; pads otherwise.
    """
    n_chunks = -(-n // chunk_rows)
    for c in range(n_chunks, 2 * n_chunks + 1):
        if n % c == 0:
            return c, n // c
    return n_chunks, -(-n // n_chunks)


def shard_rows_bound(max_rows: int, n: int, shards: int) -> int:
    """Masked rows one of ``shards`` equal blocks of ``n`` rows may hold, given ``max_rows`` for all n.

    On one shard, ``max_rows``. Split over shards, each block gets a random share of the masked
    rows, which can exceed max_rows / shards: a margin of 4 standard deviations (about 4 sqrt(mean))
    keeps the overflow (computed exactly by the all-rows path) rare.
    """
    if shards == 1:
        return max_rows
    mean = max_rows / shards
    return min(n // shards, math.ceil(mean + 4.0 * math.sqrt(mean)) + 2)


def _batch_axes() -> tuple[str, ...]:
    """The batch axes (data, fsdp) of the mesh the step traces under; () without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.shape)


def batch_shards() -> int:
    """Shards of the batch rows (data x fsdp) of the mesh the step traces under; 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in _batch_axes())


def _over_shards(x: jax.Array, shards: int) -> jax.Array:
    """Lay dim 0 of ``x`` [S, ...] over the batch axes (each device holds its shard's slice), the
    other dims as XLA likes. A no-op on one shard."""
    if shards == 1:
        return x
    spec = P(_batch_axes(), *([P.UNCONSTRAINED] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, spec)


def _shard_sums(fn, params, s_h, t_hs, labels, ce_w, mlm_w, soft_ws, teacher_heads, how):
    """Sums over one shard's block of rows: s_h [n, D], t_hs a tuple of teacher hidden states [n, D_k]
    (None where no logit term reads that teacher), labels / weights [n] -> (ce_sum without T^2, mlm_sum,
    mse_sum, mlm_correct, one sum per soft target without its scale)."""
    temperature, with_section, with_mse, soft = how
    s_logits = fn(params, s_h)
    t_logits = tuple(None if h is None else jax.lax.stop_gradient(head(h)) for h, head in zip(t_hs, teacher_heads))
    base = _logit_sums(s_logits, t_logits[0] if with_section else None, labels, ce_w, mlm_w, temperature,
                       with_mse)
    return base + (_soft_sums(s_logits, t_logits, soft_ws, soft) if soft else ())


def _blocked_sums(blocks, head, teacher_heads, how, chunk_rows, shards):
    """The sums over rows laid out as ``blocks`` (s_h, t_hs, labels, ce_w, mlm_w, soft_ws; t_hs and
    soft_ws tuples) of leaves [S, n, ...]: block s lives on the devices of batch shard s.

    The student head runs on per-shard copies of its parameters ([S, ...], one copy per shard, so one
    per device), under ``vmap`` over the shards. The gradient of those copies accumulates on each
    device over the chunks of the loop, and is reduced over the shards once, after the loop (the
    transpose of the broadcast), instead of once per chunk.
    """
    fn, params = head

    def one_shard(prm, *xs):
        return _shard_sums(fn, prm, *xs, teacher_heads, how)

    if shards == 1:
        # One shard: the parameters as they are (a [1, ...] copy would only cost a batched matmul,
        # which XLA:CPU feeds with a transposed copy of the word embedding).
        per_shard = params

        def sums_fn(prm, *xs):
            return one_shard(prm, *jax.tree.map(lambda x: x[0], xs))
    else:
        per_shard = jax.tree.map(lambda p: _over_shards(jnp.broadcast_to(p, (shards, *p.shape)), shards), params)
        sums_fn = jax.vmap(one_shard, in_axes=(0,) + (0,) * len(blocks))
    n = blocks[0].shape[1]
    rows_per_chunk = n if chunk_rows is None else max(1, chunk_rows // shards)
    if n <= rows_per_chunk:
        return tuple(jnp.sum(x) for x in sums_fn(per_shard, *blocks))
    n_chunks, rows = _chunking(n, rows_per_chunk)
    pad = n_chunks * rows - n
    fills = (0, 0, IGNORE_INDEX, 0, 0, 0)

    def split(x, fill):
        # Padding rows carry label -100 and weight 0, so they add exactly 0 to every sum.
        if pad:
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        x = x.reshape((shards, n_chunks, rows) + x.shape[2:])
        return jnp.swapaxes(x, 0, 1)  # [chunks, S, rows, ...]: every chunk is spread over all devices

    xs = tuple(jax.tree.map(lambda x, f=f: split(x, f), b) for b, f in zip(blocks, fills))
    # prevent_cse=False: inside scan the recomputation cannot be CSE'd away, and the flag would
    # only block useful optimisations (see jax.checkpoint docs).
    chunk = jax.checkpoint(sums_fn, prevent_cse=False)

    def body(carry, x):
        sums = chunk(per_shard, *x)
        return tuple(c + s for c, s in zip(carry, sums)), None

    # float32 sums, or float64 ones when everything is float64 (gradient checks under x64).
    first = jax.tree.map(lambda x: x[0], xs)
    init = tuple(jnp.zeros(o.shape, o.dtype) for o in jax.eval_shape(chunk, per_shard, *first))
    sums, _ = jax.lax.scan(body, init, xs)
    return tuple(jnp.sum(x) for x in sums)


def _as_head(head: Head | tuple) -> tuple[Callable, Any]:
    """A student head as (fn(params, hidden) -> logits, params); a plain callable has no params of
    its own (its captured arrays get their gradients through the closure)."""
    if isinstance(head, tuple):
        return head
    return (lambda _, h: head(h)), {}


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


@jax.named_scope("loss")  # labels the compiled ops (profiles: benchmarks/trace_summary.py)
def loss_sums(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array | tuple | None,
    student_head: Head | tuple,
    teacher_head: Head | tuple | None,
    labels: jax.Array,
    attention_mask: jax.Array,
    cfg: LossConfig,
    max_rows: int | None = None,
    weights: dict[str, jax.Array] | None = None,
    cos_hidden: jax.Array | None = None,
    soft: tuple[SoftTarget, ...] = (),
    with_ce: bool | None = None,
    teacher_cos: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Loss sums and row counts of one (micro-)batch, without materialising all logits at once.

    Args:
      student_hidden: [B, T, D] last hidden states of the student (any float dtype).
      teacher_hidden: [B, T, D_t] of the teacher, or None for MLM-only training; or a tuple, one
        per teacher (the first is the loss section's: L_ce, L_cos, L_mse), for ``soft``. Treated as
        constants (stop_gradient), as is everything computed from them.
      student_head: ``(fn, params)`` with ``fn(params, hidden [N, D]) -> logits [N, V]`` (e.g.
        ``lambda p, h: model.apply({"params": p}, h, method="mlm_logits")``), or a plain callable
        ``hidden -> logits``; called on subsets of rows. With ``(fn, params)`` under a mesh, the
        gradient of ``params`` is reduced over the batch shards once, however many chunks.
      teacher_head: hidden [N, D] -> logits [N, V] (a tuple of them with a tuple of teachers).
      labels: [B, T] int, original token id at masked positions, -100 elsewhere.
      attention_mask: [B, T], 1 for real tokens, 0 for padding.
      cfg: LossConfig.
      max_rows: static upper bound on the number of masked positions (see ``max_masked_rows``).
        When given and only masked rows need logits (restrict_ce_to_mask, or no teacher, and every
        soft target on rows="masked"), those rows are gathered before the heads: logits are
        [max_rows, V] instead of [B*T, V]. Under a mesh each batch shard gathers its own rows
        (``shard_rows_bound`` of them). Batches with more masked positions than this stay exact (a
        ``lax.cond`` takes the all-rows path).
      weights: {"ce", "mlm", "cos"} [B, T] float32 row weights of each sum (``loss_weights``);
        default: 1 on each loss's rows (``normalize="batch"``).
      cos_hidden: [B, T, D_t] what L_cos compares with the teacher's hidden states instead of
        ``student_hidden`` (the student's, projected to the teacher's width: loss.cos_projection).
      soft: further soft targets (``SoftTarget``: the run config's logit terms), computed on the same
        logits blocks; their row weights are ``weights["cos"]`` (rows="all") or ``weights["mlm"]``
        (rows="masked").
      with_ce: compute the section's L_ce (on the first teacher); None: with a teacher, unless
        alpha_ce = 0 and soft targets are given. (False skips the teacher's head when nothing else
        reads its logits: its "ce_sum" is 0.)
      teacher_cos: [B, T, D_t] the first teacher's last hidden states for L_cos when its head does
        not read them (a teacher cache: the head input is its stored top-k logits); default: the
        first ``teacher_hidden``.

    Returns:
      dict of float32 scalars: sums "ce_sum" (T^2 * sum of KL), "mlm_sum", "cos_sum", "mse_sum"
      (0 unless alpha_mse > 0), "mlm_correct", "soft<i>_sum" (scaled: T^2 for divergences) per soft
      target, and the counts of ``loss_counts``. Without a teacher, ce/cos/mse sums are 0.
    """
    if student_hidden.ndim != 3:
        raise UserError(f"loss_sums expects student hidden states [B, T, D], got shape {student_hidden.shape}")
    t_hiddens, t_heads = _as_tuple(teacher_hidden), _as_tuple(teacher_head)
    if len(t_hiddens) != len(t_heads) or any((h is None) != (f is None) for h, f in zip(t_hiddens, t_heads)):
        raise UserError("pass both teacher_hidden and teacher_head, or neither (MLM-only mode)")
    if any(i >= len(t_hiddens) or t_hiddens[i] is None for spec in soft for i in spec.teachers):
        raise UserError("a soft target names a teacher that loss_sums was not given")
    teacher_hidden = t_hiddens[0]
    cos_target = teacher_cos if teacher_cos is not None else teacher_hidden
    cos_in = student_hidden if cos_hidden is None else cos_hidden
    with_cos = cos_target is not None and cos_target.shape == cos_in.shape
    if cos_target is not None and not with_cos and cfg.alpha_cos > 0:
        raise UserError(
            f"teacher hidden states {cos_target.shape} differ from the student's {cos_in.shape}; L_cos "
            "needs the same width: use loss.cos_projection=linear, a student of the teacher's width, or alpha_cos=0")
    b, t, d = student_hidden.shape
    n = b * t
    head = _as_head(student_head)
    shards = batch_shards() if b % batch_shards() == 0 else 1
    labels, attention_mask = jnp.asarray(labels), jnp.asarray(attention_mask)
    out = loss_counts(labels, attention_mask, cfg)
    temp = float(cfg.temperature)
    with_mse = teacher_hidden is not None and cfg.alpha_mse > 0
    # The section's L_ce (and L_mse) on the first teacher: always with a teacher and no soft targets
    # (its metric), else only when weighted.
    if with_ce is None:
        with_ce = cfg.alpha_ce > 0 or not soft
    with_ce = teacher_hidden is not None and with_ce
    with_section = with_ce or with_mse
    used = {0} if with_section else set()
    used |= {i for spec in soft for i in spec.teachers}
    how = (temp, with_section, with_mse, tuple(soft))

    # Row-major flattening keeps each shard's rows contiguous: [B, T] rows split over the batch
    # shards give shard s the rows [s N/S, (s+1) N/S).
    def blocked(x):
        return None if x is None else _over_shards(x.reshape((shards, n // shards) + x.shape[1:]), shards)

    s_flat = student_hidden.reshape(n, d)
    t_flat = tuple(None if i not in used else jax.lax.stop_gradient(h).reshape(n, -1) for i, h in enumerate(t_hiddens))
    lab_flat = labels.reshape(n).astype(jnp.int32)
    masked = lab_flat != IGNORE_INDEX
    if weights is None:
        weights, _ = loss_weights(labels, attention_mask, cfg)
    ce_w = weights["ce"].reshape(n).astype(jnp.float32)
    mlm_w = weights["mlm"].reshape(n).astype(jnp.float32)
    if not with_section:
        ce_w = jnp.zeros_like(ce_w)
    soft_w = tuple(weights["cos" if spec.rows == "all" else "mlm"].reshape(n).astype(jnp.float32) for spec in soft)
    row_blocks = jax.tree.map(blocked, (lab_flat, ce_w, mlm_w, soft_w))

    def all_rows(s_flat, t_flat, chunk_rows=cfg.chunk_rows):
        lab_b, ce_b, mlm_b, soft_b = row_blocks
        return _blocked_sums((blocked(s_flat), jax.tree.map(blocked, t_flat), lab_b, ce_b, mlm_b, soft_b), head,
                             t_heads, how, chunk_rows, shards)

    only_masked = (not with_section or cfg.restrict_ce_to_mask) and all(spec.rows == "masked" for spec in soft)
    if only_masked and max_rows is not None and max_rows < n:
        k = shard_rows_bound(int(max_rows), n, shards)  # rows gathered per shard
        shard_counts = jnp.sum(blocked(masked), axis=1)  # [S] masked rows of each shard

        def gathered(s_flat, t_flat):
            # Each shard gathers its own masked rows (a local gather: no rows cross devices), in
            # order, into k slots; unused slots get label -100 and weight 0.
            idx = jax.vmap(lambda m: jnp.nonzero(m, size=k, fill_value=0)[0])(blocked(masked))  # [S, k]
            valid = jnp.arange(k)[None, :] < shard_counts[:, None]

            def take(x):
                xb = blocked(x)
                return _over_shards(jnp.take_along_axis(xb, idx.reshape(idx.shape + (1,) * (xb.ndim - 2)), axis=1),
                                    shards)

            s_k, t_k, lab_k, w_k, m_k, soft_k = jax.tree.map(take, (s_flat, t_flat, lab_flat, ce_w, mlm_w, soft_w))
            lab_k = jnp.where(valid, lab_k, IGNORE_INDEX)
            w_k, m_k = jnp.where(valid, w_k, 0.0), jnp.where(valid, m_k, 0.0)
            soft_k = tuple(jnp.where(valid, x, 0.0) for x in soft_k)
            return _blocked_sums((s_k, t_k, lab_k, w_k, m_k, soft_k), head, t_heads, how, cfg.chunk_rows, shards)

        def fallback(s_flat, t_flat):
            # Rare (more masked rows than max_rows): all rows, in chunks no larger than the
            # gathered block, so this branch never raises the step's peak memory.
            return all_rows(s_flat, t_flat, min(cfg.chunk_rows or k * shards, k * shards))

        fits = jnp.all(shard_counts <= k)
        sums = jax.lax.cond(fits, gathered, fallback, s_flat, t_flat)
    else:
        sums = all_rows(s_flat, t_flat)

    ce, mlm, mse, correct = sums[:4]
    zero = jnp.zeros((), jnp.float32)
    out.update(ce_sum=ce * temp**2, mlm_sum=mlm, mse_sum=mse, mlm_correct=correct, cos_sum=zero)
    for i, (spec, value) in enumerate(zip(soft, sums[4:])):
        out[f"soft{i}_sum"] = value * spec.scale
    if with_cos:  # (widths that differ with alpha_cos = 0: no L_cos to compute)
        cos = one_minus_cos_per_row(cos_in, jax.lax.stop_gradient(cos_target))
        out["cos_sum"] = jnp.sum(cos * weights["cos"])
    return out


def combine_losses(
    sums: dict[str, jax.Array], counts: dict[str, jax.Array], cfg: LossConfig
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Means and the weighted total from (aggregated) sums and counts.

    Returns (total, metrics) with metrics "loss" (= total), "loss_ce", "loss_mlm", "loss_cos",
    "loss_mse", "mlm_accuracy". An empty count gives a 0 mean rather than NaN.
    """

    def mean(key: str, count_key: str) -> jax.Array:
        return sums[key] / jnp.maximum(counts[count_key], 1.0)

    l_ce, l_mlm = mean("ce_sum", "ce_rows"), mean("mlm_sum", "mlm_rows")
    l_cos, l_mse = mean("cos_sum", "cos_rows"), mean("mse_sum", "ce_rows")
    total = cfg.alpha_ce * l_ce + (cfg.alpha_mlm + cfg.alpha_clm) * l_mlm + cfg.alpha_cos * l_cos
    if cfg.alpha_mse > 0:
        total = total + cfg.alpha_mse * l_mse
    metrics = {
        "loss": total,
        "loss_ce": l_ce,
        "loss_mlm": l_mlm,
        "loss_cos": l_cos,
        "loss_mse": l_mse,
        "mlm_accuracy": mean("mlm_correct", "masked" if "masked" in counts else "mlm_rows"),
    }
    if cfg.alpha_clm > 0:  # a causal LM: the LM cross-entropy is L_clm (and the accuracy next-token)
        metrics["loss_clm"], metrics["loss_mlm"] = l_mlm, jnp.zeros_like(l_mlm)
    return total, metrics
