"""The distillation objective: DistilBERT's triple loss (and MLM-only / causal-LM training) as an
``Objective`` of the step template (``jaxdistil.training.step``).

Follow one batch through the step the template builds around it (all inside one ``jax.jit``,
sharded by the rules of ``jaxdistil.training.sharding``):

  loader batch {input_ids, attention_mask[, segment_ids, position_ids]} [B, T], rows over data x fsdp
   -> prepare     ``mask_batch``: masking on device, ONCE on the whole batch, key
                  split(fold_in(state.rng, step))[0]; the row weights and counts of every loss
                  (``loss_weights``), before any forward pass
   -> per micro-batch (the template's ``lax.scan``), ``sums``:
        -> teacher forward   deterministic, stop_gradient, last hidden states [b, T, D]
        -> student forward   train mode (dropout key from the template), last hidden states
        -> losses            ``loss_sums`` with the MLM heads as callables (rows chunked / gathered)
   -> combine     ``combine_losses``: the means of the WHOLE batch's counts and the weighted total

Masking happens before the split so that the same batch gives the same masked positions whatever
the accumulation (the accumulation test relies on it) and so that n = ceil(0.15 * real tokens) is
counted over the whole batch, as the reference does per batch. Dropout keys differ per micro-batch,
so with dropout > 0 the equality of k x b and k*b holds in distribution, not bitwise.

MLM-only mode (no teacher and alpha_ce = alpha_cos = alpha_mse = 0) pre-trains a BERT with the same
objective. L_cos's learned projection (``loss.cos_projection: linear``) is this objective's extra
module ``cos_projection`` (``TrainState.extra``): trained with the student, never exported.
``eval_sums`` scores a model (no dropout, no update) on a batch masked with a fixed key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxdistil.data.masking import MaskingConfig, causal_labels, mask_tokens
from jaxdistil.distill.losses import (
    SUM_KEYS,
    LossConfig,
    SoftTarget,
    combine_losses,
    loss_sums,
    loss_weights,
    max_masked_rows,
)
from jaxdistil.distill import terms as terms_lib
from jaxdistil.distill.teacher_cache import OUTPUT_FIELDS, expand_top_k
from jaxdistil.errors import UserError
from jaxdistil.models import COMPUTE_DTYPES, attention, build_model
from jaxdistil.models.layers import EncoderOutput, attention_mask_from
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig

PyTree = Any
# Keys of a batch that are [B, T] arrays the models read (loader's packed batches add the last two).
MODEL_INPUTS = ("attention_mask", "segment_ids", "position_ids")
# What a teacher cache adds to a batch (``jaxdistil.distill.teacher_cache``): the first teacher's
# top-k (ids, logits) [B, T, 2K], last hidden states [B, T, D_t] and the per-layer outputs its terms
# read [B, n, ...] (the n layers of ``StepConfig.cached_layers``), float32.
CACHE_INPUTS = ("teacher_top_k", "teacher_hidden", *(f"teacher_{f}" for f in OUTPUT_FIELDS))
# The name of L_cos's learned projection (loss.cos_projection=linear) among the objective's extra
# trainable modules (TrainState.extra): trained with the student, left out of exported models.
COS_PROJECTION = "cos_projection"


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the step needs besides models, optimizer and mesh.

    loss / masking / optim: the config sections (optim.grad_accum_steps micro-batches per update).
    mask_id: the tokenizer's [MASK] id (103 in bert-base-uncased).
    dtype: compute dtype of both models ("float32" or "bfloat16"); params stay float32.
    attention: attention implementation of both models (``jaxdistil.models.attention``; "auto" is
      resolved for the platform and dtype when the models are built).
    remat: recompute the student's layers in the backward pass (less memory, ~1/3 more compute).
    group_rows: with loss.normalize="group", rows [i g, (i+1) g) of a batch are masked and averaged
      as one group (the reference's per-GPU micro-batch); unused with normalize="batch".
    frozen: ``/``-joined paths of student parameters that get no update (``models.frozen_param_paths``).
    causal: causal-LM training (GPT-2): no masking, next-token labels (``causal_labels``), and the
      LM loss is L_clm (``loss.alpha_clm``).
    projection: (student width, teacher width) of L_cos's learned projection (loss.cos_projection
      = linear), or None.
    terms: the run config's ``terms:`` (``jaxdistil.distill.terms.TermConfig``) added to the loss
      section's: logit terms (soft and hard targets, in the logits engine) and hidden-state, attention
      and relation terms; each a sum divided by its own count over the whole batch, counted before
      the forward passes (so any accumulation gives one batch's gradient); with loss.normalize=group
      their rows are weighed as the loss section's (1 / the group's rows: means per group, averaged).
    teachers: (name, mixture weight) of every teacher, in order; the first is the loss section's
      (``teacher``), the others the run config's ``teachers:`` list, read by the terms that name them.
    cached_teacher: the first teacher is read from the batch (``CACHE_INPUTS``, a teacher cache:
      ``teacher.cache``), not run: its soft targets are its stored top-k logits (renormalised over the
      top k), its last hidden states the stored ones; cached_layers: (EncoderOutput field, teacher
      layers) of the per-layer outputs the cache holds for the terms (the other layers read as zeros).
    """

    loss: LossConfig = LossConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    mask_id: int = 103
    dtype: str = "float32"
    attention: str = "auto"
    remat: bool = False
    group_rows: int = 0
    frozen: tuple[str, ...] = ()
    causal: bool = False
    projection: tuple[int, int] | None = None
    terms: tuple[terms_lib.TermConfig, ...] = ()
    teachers: tuple[tuple[str, float], ...] = (("teacher", 1.0),)
    cached_teacher: bool = False
    cached_layers: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        names = [n for n, _ in self.teachers]
        for i, term in enumerate(self.terms):
            if term.kind == "mlm_ce" and self.causal:
                raise UserError(f"terms[{i}] is mlm_ce but the student is a causal LM (GPT-2); use kind: clm_ce")
            if term.kind == "clm_ce" and not self.causal:
                raise UserError(f"terms[{i}] is clm_ce but the student is a masked LM; use kind: mlm_ce")
            missing = [n for n in term.teacher if n not in names] if term.uses_teacher else []
            if missing:
                raise UserError(f"terms[{i}] ({term.kind}) names teacher {missing[0]!r}; the run's teachers are "
                                f"{', '.join(names)} (teacher.name and the teachers: list)")
            _check_not_twice(i, term, self.loss, names[0])
        soft = [t for t in self.terms if t.kind in terms_lib.SOFT_TERMS]
        if soft and self.loss.restrict_ce_to_mask and not (self.loss.alpha_ce or self.loss.alpha_mse):
            raise UserError("loss.restrict_ce_to_mask=true only selects the rows of loss.alpha_ce / alpha_mse, which "
                            f"are 0; set rows: masked on the {soft[0].kind} term instead")
        if self.causal and self.loss.alpha_mlm > 0:
            raise UserError("loss.alpha_mlm > 0 with a causal LM (GPT-2): it has no masked-LM loss; "
                            "set loss.alpha_mlm=0 and loss.alpha_clm (the reference uses 2.0)")
        if not self.causal and self.loss.alpha_clm > 0:
            raise UserError("loss.alpha_clm > 0 with a masked LM: L_clm is for causal LMs (GPT-2); "
                            "set loss.alpha_clm=0 and use loss.alpha_mlm")
        if self.dtype not in COMPUTE_DTYPES:
            raise UserError(f"dtype {self.dtype!r} is not supported; use one of {', '.join(COMPUTE_DTYPES)}")
        if self.loss.normalize == "group" and self.group_rows < 1:
            raise UserError("loss.normalize=group needs loader.group_rows > 0: the rows masked and "
                            "averaged together (the reference's per-GPU batch_size, 5)")

    @property
    def grad_accum_steps(self) -> int:
        return self.optim.grad_accum_steps

    @property
    def compute_dtype(self) -> Any:
        return COMPUTE_DTYPES[self.dtype]


# A term that is also the loss section's own (same kind, same teacher, same layers): counted twice.
_SECTION_TERMS = {"kl": "alpha_ce", "logits_mse": "alpha_mse", "hidden_cos": "alpha_cos", "mlm_ce": "alpha_mlm",
                  "clm_ce": "alpha_clm"}


def _check_not_twice(index: int, term: terms_lib.TermConfig, loss: LossConfig, first: str) -> None:
    """One-line UserError for a term that repeats one of the loss section's weighted terms (kl on the
    first teacher alone with alpha_ce > 0, ...): the recipe would count it twice."""
    alpha = _SECTION_TERMS.get(term.kind)
    if alpha is None or not getattr(loss, alpha):
        return
    same = not term.uses_teacher or (term.teacher == (first,) and (term.kind != "hidden_cos" or term.layers is None))
    if same:
        raise UserError(f"terms[{index}] ({term.kind}) repeats the loss section's loss.{alpha}={getattr(loss, alpha)}: "
                        f"it would count twice; set loss.{alpha}=0 (the terms form) or remove the term")


def build_models(cfg: StepConfig, student_cfg: Any, teacher_cfg: Any | None = None):
    """(student, teacher | None) Flax modules with the step's compute dtype and attention (remat:
    student only)."""
    impl = attention.resolve(cfg.attention, cfg.compute_dtype)
    student = build_model(student_cfg, dtype=cfg.compute_dtype, remat=cfg.remat, attention=impl)
    teacher = None if teacher_cfg is None else build_teacher(cfg, teacher_cfg)
    return student, teacher


def build_teacher(cfg: StepConfig, teacher_cfg: Any) -> nn.Module:
    """A teacher's Flax module with the step's compute dtype and attention."""
    return build_model(teacher_cfg, dtype=cfg.compute_dtype, attention=attention.resolve(cfg.attention,
                                                                                          cfg.compute_dtype))


def _check_models(student: nn.Module, teachers: tuple, cfg: StepConfig) -> None:
    teacher = teachers[0]
    needs = [t for t in cfg.terms if t.uses_teacher]
    if needs and teacher is None:
        raise UserError(f"terms: {needs[0].kind} needs a teacher; give teacher.model or remove the term")
    if len(teachers) != len(cfg.teachers):
        raise UserError(f"{len(teachers)} teacher models for the {len(cfg.teachers)} teachers the step names")
    if teacher is None:
        names = ("alpha_ce", "alpha_cos", "alpha_mse")
        used = {k: getattr(cfg.loss, k) for k in names if getattr(cfg.loss, k)}
        if used:
            name = next(iter(used))
            raise UserError(f"no teacher given but loss.{name}={used[name]}; set alpha_ce, alpha_cos and "
                            "alpha_mse to 0 for MLM-only training, or give a teacher")
        return
    if teacher.cfg.vocab_size != student.cfg.vocab_size:
        raise UserError(f"teacher vocab {teacher.cfg.vocab_size} != student vocab {student.cfg.vocab_size}; "
                        "both models must share the tokenizer")
    if teacher.cfg.causal != student.cfg.causal:
        kinds = {True: "causal", False: "masked"}
        raise UserError(f"the teacher ({teacher.cfg.model_type}) is a {kinds[teacher.cfg.causal]} LM but the student "
                        f"({student.cfg.model_type}) a {kinds[student.cfg.causal]} one; distil like into like")
    if cfg.loss.alpha_cos and teacher.cfg.hidden != student.cfg.hidden and cfg.projection is None:
        raise UserError(f"teacher hidden size {teacher.cfg.hidden} != student hidden size {student.cfg.hidden}: "
                        "L_cos needs equal widths; set loss.cos_projection=linear (a learned projection), "
                        "loss.alpha_cos=0, or use a student of the teacher's width")
    names = [n for n, _ in cfg.teachers]
    for i, model in enumerate(teachers[1:], 1):
        if model.cfg.causal != student.cfg.causal:
            raise UserError(f"teacher {names[i]} ({model.cfg.model_type}) and the student ({student.cfg.model_type}) "
                            "are not both masked or both causal LMs; distil like into like")
        if not any(names[i] in t.teacher for t in needs):
            raise UserError(f"teacher {names[i]} is named by no term; name it in a term's teacher: or remove it "
                            "from teachers:")
    for i, term in enumerate(cfg.terms):
        if not term.uses_teacher:
            continue
        models = [teachers[names.index(n)] for n in term.teacher]
        if term.on_logits:
            vocabs = {n: m.cfg.vocab_size for n, m in zip(term.teacher, models)}
            if len(set(vocabs.values())) > 1:
                listed = ", ".join(f"{n} ({v})" for n, v in vocabs.items())
                raise UserError(f"terms[{i}] ({term.kind}) mixes teachers with different vocabularies: {listed}; "
                                "a mixture of soft targets needs one vocabulary: name teachers that share the "
                                "student's tokenizer")
            bad = [n for n, v in vocabs.items() if v != student.cfg.vocab_size]
            if bad:
                raise UserError(f"terms[{i}] ({term.kind}): teacher {bad[0]} has a vocabulary of {vocabs[bad[0]]} "
                                f"tokens, the student {student.cfg.vocab_size}; soft targets compare distributions "
                                "over one vocabulary: use a hidden-state or attention term for this teacher")
            continue
        _check_term(i, term, student, models[0])


def _check_term(index: int, term: terms_lib.TermConfig, student: nn.Module, teacher: nn.Module) -> None:
    """A term on the models' output shapes (no computation): layer indices, widths, head counts and
    relation heads are checked here, before any run file is written."""
    b, t = 1, 2
    proj = None
    if term.projection:
        proj = {"kernel": jax.ShapeDtypeStruct((student.cfg.hidden, teacher.cfg.hidden), jnp.float32),
                "bias": jax.ShapeDtypeStruct((teacher.cfg.hidden,), jnp.float32)}
    try:
        jax.eval_shape(functools.partial(terms_lib.run_term, term), model_outputs(student.cfg, b, t),
                       model_outputs(teacher.cfg, b, t),
                       jax.ShapeDtypeStruct((b, t), jnp.float32), jax.ShapeDtypeStruct((b, 1, t, t), jnp.bool_), proj)
    except UserError as err:
        raise UserError(f"terms[{index}] ({term.kind}): {err}") from None


def _model_kwargs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def mask_batch(
    batch: Mapping[str, jax.Array], token_weights: jax.Array, key: jax.Array, cfg: StepConfig, vocab_size: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Masks the WHOLE batch and weighs the rows of each loss, before any forward pass.

    batch: {input_ids, attention_mask[, segment_ids, position_ids]} [B, T].
    counts also hold each non-logit term's denominator "term<i>_count" (``term_counts``), so that its
    mean divides by the whole batch's count whatever the accumulation.
    loss.normalize="batch": one masking over the batch (n = ceil(p * its real tokens)).
    loss.normalize="group": every group of ``group_rows`` rows masked on its own (n per group), as
      the reference masks each micro-batch.
    causal: no masking; labels are the next tokens (``causal_labels``).
    Returns (inputs {input_ids (masked), labels, w_ce, w_mlm, w_cos, attention_mask[, ...]} [B, T],
    counts: the denominators of ``combine_losses``, see ``losses.loss_weights``).
    """
    ids, attention = batch["input_ids"], batch["attention_mask"]
    if cfg.causal:  # GPT-2: the input as it is, every next token a label
        masked_ids, labels = ids, causal_labels(ids, attention, batch.get("segment_ids"))
    elif cfg.loss.normalize == "group":
        b, t = ids.shape
        g = cfg.group_rows
        if b % g:
            raise UserError(f"batch size {b} is not a multiple of loader.group_rows={g}")
        keys = jax.random.split(key, b // g)
        masked_ids, labels = jax.vmap(
            lambda k, i, m: mask_tokens(k, i, m, token_weights, cfg.mask_id, vocab_size, cfg.masking)
        )(keys, ids.reshape(b // g, g, t), attention.reshape(b // g, g, t))
        masked_ids, labels = masked_ids.reshape(b, t), labels.reshape(b, t)
    else:
        masked_ids, labels = mask_tokens(key, ids, attention, token_weights, cfg.mask_id, vocab_size,
                                         cfg.masking)
    weights, counts = loss_weights(labels, attention, cfg.loss, cfg.group_rows)
    inputs = {"input_ids": masked_ids, "labels": labels, **_model_kwargs(batch),
              **{k: batch[k] for k in CACHE_INPUTS if k in batch}}
    inputs.update({f"w_{k}": w for k, w in weights.items()})
    return inputs, counts


def step_masks(batch: Mapping[str, jax.Array], token_weights: jax.Array, key: jax.Array, cfg: StepConfig,
               vocab_size: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``mask_batch`` with the masking key of the update whose key is ``key`` (``step_key``): what the
    step's ``prepare`` and a teacher cache (the teacher's inputs of every update) both mask with."""
    return mask_batch(batch, token_weights, jax.random.split(key)[0], cfg, vocab_size)


def soft_targets(cfg: StepConfig) -> tuple[tuple[int, SoftTarget], ...]:
    """(term index, ``losses.SoftTarget``) of each soft-target term (kl, reverse_kl, jsd, logits_mse):
    its teachers as indices into ``cfg.teachers`` with mixture weights proportional to the teachers'
    weights."""
    names = [n for n, _ in cfg.teachers]
    weight = dict(cfg.teachers)
    out = []
    for i, term in enumerate(cfg.terms):
        if term.kind not in terms_lib.SOFT_TERMS:
            continue
        opts = terms_lib.resolve_options(term.kind, term.options)
        total = sum(weight[n] for n in term.teacher)
        if not total > 0:
            raise UserError(f"terms[{i}] ({term.kind}) mixes teachers whose weights add up to {total}; give them "
                            "weights > 0")
        out.append((i, SoftTarget(term.kind, tuple(names.index(n) for n in term.teacher),
                                  tuple(weight[n] / total for n in term.teacher), opts.get("temperature", 1.0),
                                  opts.get("beta", 0.5), term.rows or "all")))
    return tuple(out)


def micro_batch_sums(
    student_model: nn.Module,
    teacher_models: tuple,
    cfg: StepConfig,
    params: PyTree,
    teacher_params: tuple,
    mb: Mapping[str, jax.Array],
    dropout_key: jax.Array,
    max_rows: int | None = None,
    projection: PyTree | None = None,
    term_projections: Mapping[str, PyTree] | None = None,
) -> dict[str, jax.Array]:
    """Loss sums (float32 scalars ``SUM_KEYS``) of one masked micro-batch ``mb`` [b, T].

    teacher_models / teacher_params: one per ``cfg.teachers`` (the first None in MLM-only mode).
    Teachers: deterministic, no gradient; a teacher of the ``teachers:`` list only runs as far as
    its terms need (its MLM head only for soft targets). Student: train mode (dropout from
    ``dropout_key``). The MLM heads are passed to ``loss_sums`` as callables, which run them on
    chunks or on the gathered masked rows only. projection: L_cos's {kernel, bias}
    (``COS_PROJECTION``) or None. With ``cfg.terms`` the models also return what the terms read,
    and the sums hold each term's "term<i>_sum"; term_projections: the terms' projections by
    ``term_projection_name``.
    """
    kwargs = _model_kwargs(mb)
    names = [n for n, _ in cfg.teachers]
    soft = soft_targets(cfg)
    with_logits = {0} | {k for _, spec in soft for k in spec.teachers}
    t_encs, t_hidden, t_heads = [], [], []
    for k, (model, t_params) in enumerate(zip(teacher_models, teacher_params)):
        if k == 0 and cfg.cached_teacher:  # read, not run: its stored outputs
            t_encs.append(_cached_outputs(cfg, model.cfg, mb))
            t_hidden.append(mb["teacher_top_k"] if k in with_logits else None)
            t_heads.append((lambda x, v=model.cfg.vocab_size: expand_top_k(x, v)) if k in with_logits else None)
            continue
        if model is None:
            t_encs.append(None), t_hidden.append(None), t_heads.append(None)
            continue
        t_vars = {"params": t_params}
        enc = jax.lax.stop_gradient(model.apply(t_vars, mb["input_ids"], deterministic=True, method="encode",
                                                outputs=terms_lib.requested_outputs(cfg.terms, names[k]), **kwargs))
        t_encs.append(enc)
        t_hidden.append(enc.last_hidden_state if k in with_logits else None)
        t_heads.append((lambda h, m=model, v=t_vars: m.apply(v, h, method="mlm_logits")) if k in with_logits else None)
    s_vars = {"params": params}
    s_enc = student_model.apply(
        s_vars, mb["input_ids"], deterministic=False, rngs={"dropout": dropout_key}, method="encode",
        outputs=terms_lib.requested_outputs(cfg.terms), **kwargs)
    student_hidden = s_enc.last_hidden_state
    # (fn, params): the loss runs the head on per-shard copies of the params, so that their gradient
    # is reduced once per micro-batch, not once per chunk of rows (jaxdistil.distill.losses).
    student_head = (lambda p, h: student_model.apply({"params": p}, h, method="mlm_logits"), params)
    weights = {k: mb[f"w_{k}"] for k in ("ce", "mlm", "cos")}
    cos_hidden = None
    if projection is not None and t_hidden and t_hidden[0] is not None:
        # L_cos on the student's hidden states mapped to the teacher's width (float32, like the loss).
        cos_hidden = (student_hidden.astype(jnp.float32) @ projection["kernel"].astype(jnp.float32)
                      + projection["bias"].astype(jnp.float32))
    sums = loss_sums(student_hidden, tuple(t_hidden) or None, student_head, tuple(t_heads) or None, mb["labels"],
                     mb["attention_mask"], cfg.loss, max_rows=max_rows, weights=weights, cos_hidden=cos_hidden,
                     soft=tuple(spec for _, spec in soft), with_ce=cfg.loss.alpha_ce > 0 or not cfg.terms,
                     teacher_cos=_cached_cos(cfg, mb))
    out = {key: sums[key] for key in SUM_KEYS}
    for j, (i, _) in enumerate(soft):
        out[f"term{i}_sum"] = sums[f"soft{j}_sum"]
    if any(not t.on_logits for t in cfg.terms):
        with jax.named_scope("terms"):
            out.update(_term_sums(cfg, student_model, s_enc, t_encs, mb, term_projections or {}))
    return out


def _cached_outputs(cfg: StepConfig, teacher_cfg: Any, mb: Mapping[str, jax.Array]) -> EncoderOutput:
    """A cached teacher's EncoderOutput: its stored layers of each field in place (zeros elsewhere,
    which no term reads: the cache was refused unless it holds every layer they read)."""
    stacks = {}
    for field, layers in cfg.cached_layers:
        got = jnp.moveaxis(mb[f"teacher_{field}"], 1, 0)  # [n stored, b, ...]
        total = teacher_cfg.layers + (field == "hidden_states")
        stacks[field] = jnp.zeros((total,) + got.shape[1:], got.dtype).at[jnp.asarray(layers)].set(got)
    return EncoderOutput(mb.get("teacher_hidden"), stacks.pop("hidden_states", None), **stacks)


def _cached_cos(cfg: StepConfig, mb: Mapping[str, jax.Array]) -> jax.Array | None:
    """L_cos's teacher side for a cached teacher: its stored last hidden states, or (none stored,
    alpha_cos = 0) an empty array whose shape no student matches, so no L_cos is computed on the
    stored top-k logits."""
    if not cfg.cached_teacher:
        return None
    b, t = mb["input_ids"].shape
    return mb["teacher_hidden"] if "teacher_hidden" in mb else jnp.zeros((b, t, 0), jnp.float32)


def _term_inputs(cfg: StepConfig, student_model: nn.Module, mb: Mapping[str, jax.Array], rows: jax.Array):
    """(rows, key mask) of the non-logit terms: rows the [B, T] weights of the real tokens (the loss
    section's L_cos weights: 1 per token, or 1 / tokens of its group with loss.normalize=group), the
    key mask [B, 1, T, T] of padding, packed segments and causal LMs."""
    b, t = mb["input_ids"].shape
    mask = attention_mask_from(mb["attention_mask"], mb.get("segment_ids"), (b, t), causal=student_model.cfg.causal)
    return rows.astype(jnp.float32), mask


def _term_sums(cfg: StepConfig, student_model: nn.Module, s_enc, t_encs, mb, projections) -> dict[str, jax.Array]:
    """The non-logit terms' sums of one micro-batch: "term<i>_sum" (float32), over the real tokens."""
    rows, mask = _term_inputs(cfg, student_model, mb, mb["w_cos"])
    names = [n for n, _ in cfg.teachers]
    out = {}
    for i, term in enumerate(cfg.terms):
        if term.on_logits:
            continue
        t_enc = t_encs[names.index(term.teacher[0])]
        r = terms_lib.run_term(term, s_enc, t_enc, rows, mask, projections.get(term_projection_name(i)))
        out[f"term{i}_sum"] = r["sum"].astype(jnp.float32)
    return out


def term_counts(cfg: StepConfig, student: nn.Module, teachers: tuple, batch: Mapping[str, jax.Array],
                rows: jax.Array) -> dict[str, jax.Array]:
    """The non-logit terms' denominators "term<i>_count" over a whole batch, before any forward pass:
    a term's count depends on its rows, key mask and the models' shapes only, so it is the term run
    on zero outputs of those shapes, of which XLA keeps only the count (the rest is dead code)."""
    b, t = batch["input_ids"].shape
    rows, mask = _term_inputs(cfg, student, batch, rows)
    names = [n for n, _ in cfg.teachers]
    out = {}
    for i, term in enumerate(cfg.terms):
        if term.on_logits:
            continue
        teacher = teachers[names.index(term.teacher[0])]
        proj = None
        if term.projection:
            proj = {"kernel": jnp.zeros((student.cfg.hidden, teacher.cfg.hidden)),
                    "bias": jnp.zeros((teacher.cfg.hidden,))}
        zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (model_outputs(student.cfg, b, t),
                                                                       model_outputs(teacher.cfg, b, t)))
        out[f"term{i}_count"] = terms_lib.run_term(term, *zeros, rows, mask, proj)["count"].astype(jnp.float32)
    return out


def model_outputs(c: Any, b: int, t: int) -> EncoderOutput:
    """The shapes (``jax.ShapeDtypeStruct``, float32) of everything ``encode`` can return for a model
    config ``c`` on a [b, t] batch."""
    def shape(*dims):
        return jax.ShapeDtypeStruct(dims, jnp.float32)

    hd = c.hidden // c.heads
    return EncoderOutput(shape(b, t, c.hidden), shape(c.layers + 1, b, t, c.hidden),
                         attentions=shape(c.layers, b, c.heads, t, t), scores=shape(c.layers, b, c.heads, t, t),
                         queries=shape(c.layers, b, t, c.heads, hd), keys=shape(c.layers, b, t, c.heads, hd),
                         values=shape(c.layers, b, t, c.heads, hd))


def term_projection_name(index: int) -> str:
    """The extra trainable module of term ``index``'s projection (``projection: true``)."""
    return f"term{index}_projection"


def max_rows_bound(cfg: StepConfig, micro_batch: int, length: int) -> int | None:
    """Static bound on the masked rows of one micro-batch of ``micro_batch`` x ``length`` (``loss_sums``'s
    ``max_rows``), or None when every row is labelled (causal LMs)."""
    if cfg.causal:
        return None  # every real token but the last of each row is labelled: nothing to gather
    k = cfg.grad_accum_steps
    # The masking ran on the whole batch (or on groups spread over the micro-batches), so a
    # micro-batch gets a random share of the masked positions: the bound needs its margin; groups
    # each round their count up, by at most one position per group.
    max_rows = max_masked_rows(micro_batch, length, cfg.masking.mlm_mask_prop, masked_batch=micro_batch * k)
    if cfg.loss.normalize == "group":
        max_rows = min(micro_batch * length, max_rows + micro_batch * k // cfg.group_rows)
    return max_rows


class DistillObjective:
    """The triple loss, and the ``terms:`` list, as the step template's ``Objective``.

    teacher: the loss section's teacher (None in MLM-only mode); extra_teachers: the modules of
    ``cfg.teachers[1:]`` (the run config's ``teachers:`` list), in order.
    consts: {"teacher": the teacher's params (None in MLM-only mode), "teachers": a tuple of the
    extra teachers' params, "token_weights": [V] float32 masking weights (0 for special tokens)}.
    metrics: "loss", "loss_ce" (not computed without a teacher, nor when alpha_ce = 0 with terms),
    "loss_mlm", "loss_cos", "loss_mse", "mlm_accuracy" (and "loss_clm" for causal LMs), one
    "loss_<kind>" per configured term (``terms.term_names``); totals: real and masked tokens.
    """

    totals = {"tokens": "tokens", "masked_tokens": "masked"}

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg: StepConfig,
                 extra_teachers: tuple[nn.Module, ...] = ()):
        self.teachers = (teacher, *extra_teachers)
        _check_models(student, self.teachers, cfg)
        self.student, self.teacher, self.cfg = student, teacher, cfg
        self.extra_init = {}
        std = student.cfg.initializer_range
        if cfg.projection is not None:
            self.extra_init = {COS_PROJECTION: lambda key: projection_params(key, cfg.projection, std)}
        names = [n for n, _ in cfg.teachers]
        for i, term in enumerate(cfg.terms):
            if term.projection:
                widths = (student.cfg.hidden, self.teachers[names.index(term.teacher[0])].cfg.hidden)
                self.extra_init[term_projection_name(i)] = (
                    lambda key, w=widths: projection_params(key, w, std))
        self.term_names = terms_lib.term_names(cfg.terms)
        # The section's L_ce: computed when weighted, and without terms (its metric, as before terms).
        self.with_ce = teacher is not None and (cfg.loss.alpha_ce > 0 or not cfg.terms)

    def prepare(self, batch, consts, key):
        with jax.named_scope("masking"):  # labels the compiled ops (profiles: benchmarks/trace_summary.py)
            inputs, counts = step_masks(batch, consts["token_weights"], key, self.cfg, self.student.cfg.vocab_size)
        if any(not t.on_logits for t in self.cfg.terms):
            counts.update(term_counts(self.cfg, self.student, self.teachers, inputs, inputs["w_cos"]))
        return inputs, counts

    def sums(self, params, micro, consts, key):
        b, t = micro["input_ids"].shape
        teacher_params = (consts["teacher"], *consts.get("teachers", ()))
        return micro_batch_sums(self.student, self.teachers, self.cfg, params["model"], teacher_params, micro,
                                key, max_rows_bound(self.cfg, b, t), params["extra"].get(COS_PROJECTION),
                                params["extra"])

    def combine(self, sums, counts):
        total, metrics = combine_losses(sums, counts, self.cfg.loss)
        if not self.with_ce:
            metrics.pop("loss_ce")
        if self.cfg.causal and "loss_clm" not in metrics:  # terms: clm_ce, alpha_clm = 0: still L_clm
            metrics["loss_clm"], metrics["loss_mlm"] = metrics["loss_mlm"], jnp.zeros_like(metrics["loss_mlm"])
        for i, (term, name) in enumerate(zip(self.cfg.terms, self.term_names)):
            if term.kind in terms_lib.HARD_TERMS:
                total_sum, count = sums["mlm_sum"], counts["mlm_rows"]
            elif term.kind in terms_lib.SOFT_TERMS:
                total_sum, count = sums[f"term{i}_sum"], counts["cos_rows" if (term.rows or "all") == "all"
                                                                else "mlm_rows"]
            else:
                total_sum, count = sums[f"term{i}_sum"], counts[f"term{i}_count"]
            mean = total_sum / jnp.maximum(count, 1.0)
            metrics[name] = mean
            total = total + term.weight * mean
        metrics["loss"] = total
        return total, metrics


def eval_sums(model: nn.Module, cfg: StepConfig, baseline_id: int | None = None):
    """``fn(params, batch, token_weights, rng) -> sums``: a model's held-out masked-LM sums on a
    batch masked with ``rng`` (pass the same key every evaluation so scores are comparable), no
    dropout. Sums add up over batches: "mlm_sum", "mlm_rows", "mlm_correct", "tokens"; loss =
    mlm_sum / mlm_rows, accuracy = mlm_correct / mlm_rows. With ``baseline_id`` (e.g. the most
    frequent token), also "baseline_correct": masked positions whose label it is.
    Jit it with ``jaxdistil.training.step.make_eval_step``.
    """
    vocab = model.cfg.vocab_size
    mlm_only = dataclasses.replace(cfg.loss, alpha_ce=0.0, alpha_cos=0.0, alpha_mse=0.0)

    def fn(params, batch, token_weights, rng):
        if cfg.causal:  # next-token prediction on the text as it is
            masked_ids = batch["input_ids"]
            labels = causal_labels(masked_ids, batch["attention_mask"], batch.get("segment_ids"))
        else:
            masked_ids, labels = mask_tokens(rng, batch["input_ids"], batch["attention_mask"],
                                             token_weights, cfg.mask_id, vocab, cfg.masking)
        v = {"params": params}
        hidden = model.apply(v, masked_ids, deterministic=True, method="encode",
                             **_model_kwargs(batch)).last_hidden_state
        head = lambda h: model.apply(v, h, method="mlm_logits")  # noqa: E731
        max_rows = None if cfg.causal else max_masked_rows(masked_ids.shape[0], masked_ids.shape[1],
                                                           cfg.masking.mlm_mask_prop)
        sums = loss_sums(hidden, None, head, None, labels, batch["attention_mask"], mlm_only, max_rows=max_rows)
        out = {"mlm_sum": sums["mlm_sum"], "mlm_rows": sums["mlm_rows"],
               "mlm_correct": sums["mlm_correct"], "tokens": sums["cos_rows"]}
        if baseline_id is not None:
            out["baseline_correct"] = jnp.sum(labels == baseline_id, dtype=jnp.float32)
        return out

    return fn


def projection_params(key: jax.Array, widths: tuple[int, int], std: float, boxed: bool = True) -> PyTree:
    """L_cos's projection {kernel [D_s, D_t] ~ N(0, std), bias [D_t] zeros}, boxed with logical axes
    ("embed", "teacher_embed") like the models' params."""
    d_s, d_t = widths
    kernel = std * jax.random.normal(key, (d_s, d_t), jnp.float32)
    bias = jnp.zeros((d_t,), jnp.float32)
    if not boxed:
        return {"kernel": kernel, "bias": bias}
    return {"kernel": nn.Partitioned(kernel, names=("embed", "teacher_embed")),
            "bias": nn.Partitioned(bias, names=("teacher_embed",))}


def shard_teacher(
    model: nn.Module,
    params: PyTree,
    mesh: Mesh,
    rules: shd.Rules = shd.RULES,
    sample_shape: tuple[int, int] = (1, 8),
    strict: bool = False,
) -> tuple[PyTree, PyTree]:
    """Places the teacher's (unboxed) params by the rules: returns (sharded params, their shardings)."""
    shardings = shd.param_shardings(model, mesh, rules, sample_shape, strict)
    return shd.shard_params(params, shardings), shardings
