"""The distillation train step: one jitted function from (state, teacher params, batch) to a new state.

Follow one batch through ``make_train_step``'s function (all inside one ``jax.jit``, sharded by the
rules of ``jaxdistil.distill.sharding``):

  loader batch {input_ids, attention_mask[, segment_ids, position_ids]} [B, T], rows over data x fsdp
   -> masking     ``mask_tokens`` on device, ONCE on the whole batch, key fold_in(state.rng, step)
   -> counts      ``loss_counts`` of the WHOLE batch (rows of each loss), before any forward pass
   -> split       into k = grad_accum_steps micro-batches [k, B/k, T] (strided: micro-batch j holds
                  rows j, j+k, j+2k, ... so every device keeps its own rows), ``lax.scan`` over them:
        -> teacher forward   deterministic, stop_gradient, last hidden states [b, T, D]
        -> student forward   train mode (dropout key fold_in(step key, j)), last hidden states
        -> losses            ``loss_sums`` with the MLM heads as callables (rows chunked / gathered)
        -> grads             of ``combine_losses(micro sums, WHOLE-batch counts)``
   -> sum of the micro-batch grads and sums: since every loss is (sum over rows) / (rows of the whole
      batch), k micro-batches of b rows give exactly the gradient of one batch of k*b rows
   -> update      the AdamW chain of ``jaxdistil.distill.optim`` (clip, moments, decay, schedule)
   -> metrics     each loss, total, grad norm, lr, tokens, masked tokens, MLM accuracy: global values
                  (jit arrays are global, so sums over the batch are already all-reduced).

Masking happens before the split so that the same batch gives the same masked positions whatever
the accumulation (the accumulation test relies on it) and so that n = ceil(0.15 * real tokens) is
counted over the whole batch, as the reference does per batch. Dropout keys differ per micro-batch,
so with dropout > 0 the equality of k x b and k*b holds in distribution, not bitwise.

MLM-only mode (``teacher_model=None`` and alpha_ce = alpha_cos = alpha_mse = 0) pre-trains a BERT
with the same step. ``make_eval_step`` scores a model (no dropout, no update) on a batch masked
with a fixed key. ``init_train_state`` creates the state born sharded; ``shard_teacher`` places the
teacher's params by the same rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistil.data.masking import MaskingConfig, causal_labels, mask_tokens
from jaxdistil.distill import sharding as shd
from jaxdistil.distill.losses import (
    SUM_KEYS, LossConfig, combine_losses, loss_sums, loss_weights, max_masked_rows)
from jaxdistil.distill.optim import OptimConfig, frozen_param_paths, trainable_global_norm
from jaxdistil.errors import UserError
from jaxdistil.models import COMPUTE_DTYPES, build_model

PyTree = Any
# Keys of a batch that are [B, T] arrays the models read (loader's packed batches add the last two).
MODEL_INPUTS = ("attention_mask", "segment_ids", "position_ids")
# The params key of L_cos's learned projection (loss.cos_projection=linear), beside the model's own
# params in TrainState.params: trained with the student, left out of exported models.
COS_PROJECTION = "cos_projection"


def split_params(params: PyTree) -> tuple[PyTree, PyTree | None]:
    """(the model's params, the L_cos projection's {kernel, bias} or None)."""
    if isinstance(params, Mapping) and COS_PROJECTION in params:
        return {k: v for k, v in params.items() if k != COS_PROJECTION}, params[COS_PROJECTION]
    return params, None


@struct.dataclass
class TrainState:
    """What the step updates. ``step``: int32 scalar, optimizer updates done; ``params``: the
    student's (unboxed) params; ``opt_state``: AdamW state; ``rng``: base PRNG key (raw uint32 [2]),
    the key of update s is ``fold_in(rng, s)`` so that a resumed run draws the same masks."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Everything the step needs besides models, optimizer and mesh.

    loss / masking / optim: the config sections (optim.grad_accum_steps micro-batches per update).
    mask_id: the tokenizer's [MASK] id (103 in bert-base-uncased).
    dtype: compute dtype of both models ("float32" or "bfloat16"); params stay float32.
    remat: recompute the student's layers in the backward pass (less memory, ~1/3 more compute).
    group_rows: with loss.normalize="group", rows [i g, (i+1) g) of a batch are masked and averaged
      as one group (the reference's per-GPU micro-batch); unused with normalize="batch".
    frozen: ``/``-joined paths of student parameters that get no update (``optim.frozen_param_paths``).
    causal: causal-LM training (GPT-2): no masking, next-token labels (``causal_labels``), and the
      LM loss is L_clm (``loss.alpha_clm``).
    projection: (student width, teacher width) of L_cos's learned projection (loss.cos_projection
      = linear), or None.
    """

    loss: LossConfig = LossConfig()
    masking: MaskingConfig = MaskingConfig()
    optim: OptimConfig = OptimConfig()
    mask_id: int = 103
    dtype: str = "float32"
    remat: bool = False
    group_rows: int = 0
    frozen: tuple[str, ...] = ()
    causal: bool = False
    projection: tuple[int, int] | None = None

    def __post_init__(self) -> None:
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


def build_models(cfg: StepConfig, student_cfg: Any, teacher_cfg: Any | None = None):
    """(student, teacher | None) Flax modules with the step's compute dtype (remat: student only)."""
    student = build_model(student_cfg, dtype=cfg.compute_dtype, remat=cfg.remat)
    teacher = None if teacher_cfg is None else build_model(teacher_cfg, dtype=cfg.compute_dtype)
    return student, teacher


def _check_models(student: nn.Module, teacher: nn.Module | None, cfg: StepConfig) -> None:
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


def _model_kwargs(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def _split_micro(x: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ... (strided).

    Strided, not contiguous: the batch rows are split in contiguous blocks over data x fsdp, so the
    reshape [B] -> [B/k, k] keeps each device's rows on that device and the scan needs no transfer.
    """
    y = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
        return y
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, shd.BATCH_AXES)))


def mask_batch(
    batch: Mapping[str, jax.Array], token_weights: jax.Array, key: jax.Array, cfg: StepConfig, vocab_size: int
) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """Masks the WHOLE batch and weighs the rows of each loss, before any forward pass.

    batch: {input_ids, attention_mask[, segment_ids, position_ids]} [B, T].
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
    inputs = {"input_ids": masked_ids, "labels": labels, **_model_kwargs(batch)}
    inputs.update({f"w_{k}": w for k, w in weights.items()})
    return inputs, counts


def micro_batch_sums(
    student_model: nn.Module,
    teacher_model: nn.Module | None,
    cfg: StepConfig,
    params: PyTree,
    teacher_params: PyTree | None,
    mb: Mapping[str, jax.Array],
    dropout_key: jax.Array,
    max_rows: int | None = None,
) -> dict[str, jax.Array]:
    """Loss sums (float32 scalars ``SUM_KEYS``) of one masked micro-batch ``mb`` [b, T].

    Teacher: deterministic, no gradient. Student: train mode (dropout from ``dropout_key``).
    The MLM heads are passed to ``loss_sums`` as callables, which run them on chunks or on the
    gathered masked rows only.
    """
    kwargs = _model_kwargs(mb)
    params, projection = split_params(params)
    teacher_hidden = teacher_head = None
    if teacher_model is not None:
        t_vars = {"params": teacher_params}
        teacher_hidden = teacher_model.apply(
            t_vars, mb["input_ids"], deterministic=True, method="encode", **kwargs
        ).last_hidden_state
        teacher_hidden = jax.lax.stop_gradient(teacher_hidden)
        teacher_head = lambda h: teacher_model.apply(t_vars, h, method="mlm_logits")  # noqa: E731
    s_vars = {"params": params}
    student_hidden = student_model.apply(
        s_vars, mb["input_ids"], deterministic=False, rngs={"dropout": dropout_key}, method="encode", **kwargs
    ).last_hidden_state
    # (fn, params): the loss runs the head on per-shard copies of the params, so that their gradient
    # is reduced once per micro-batch, not once per chunk of rows (jaxdistil.distill.losses).
    student_head = (lambda p, h: student_model.apply({"params": p}, h, method="mlm_logits"), params)
    weights = {k: mb[f"w_{k}"] for k in ("ce", "mlm", "cos")}
    cos_hidden = None
    if projection is not None and teacher_hidden is not None:
        # L_cos on the student's hidden states mapped to the teacher's width (float32, like the loss).
        cos_hidden = (student_hidden.astype(jnp.float32) @ projection["kernel"].astype(jnp.float32)
                      + projection["bias"].astype(jnp.float32))
    sums = loss_sums(student_hidden, teacher_hidden, student_head, teacher_head, mb["labels"],
                     mb["attention_mask"], cfg.loss, max_rows=max_rows, weights=weights, cos_hidden=cos_hidden)
    return {key: sums[key] for key in SUM_KEYS}


def accumulate_grads(
    student_model: nn.Module,
    teacher_model: nn.Module | None,
    cfg: StepConfig,
    params: PyTree,
    teacher_params: PyTree | None,
    inputs: Mapping[str, jax.Array],
    counts: Mapping[str, jax.Array],
    dropout_key: jax.Array,
    mesh: Mesh | None = None,
    param_shardings: PyTree | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Gradient of the batch's total loss and the batch's loss sums, over ``grad_accum_steps``
    micro-batches (``lax.scan``); each micro-batch's loss is its sums divided by the WHOLE batch's
    ``counts``, so the summed gradients are exactly those of the whole batch.

    inputs: masked batch [B, T] from ``mask_batch``; B must be a multiple of grad_accum_steps.
    Returns (grads like params, sums ``SUM_KEYS`` of the whole batch).
    """
    k = cfg.grad_accum_steps
    batch, length = inputs["input_ids"].shape
    if batch % k:
        raise UserError(f"batch size {batch} is not a multiple of grad_accum_steps={k}")
    # The masking ran on the whole batch (or on groups spread over the micro-batches), so a
    # micro-batch gets a random share of the masked positions: the bound needs its margin; groups
    # each round their count up, by at most one position per group.
    max_rows = max_masked_rows(batch // k, length, cfg.masking.mlm_mask_prop, masked_batch=batch)
    if cfg.loss.normalize == "group":
        max_rows = min(batch // k * length, max_rows + batch // cfg.group_rows)
    if cfg.causal:
        max_rows = None  # every real token but the last of each row is labelled: nothing to gather

    def loss_fn(p, mb, dkey):
        sums = micro_batch_sums(student_model, teacher_model, cfg, p, teacher_params, mb, dkey, max_rows)
        total, _ = combine_losses(sums, counts, cfg.loss)
        return total, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if k == 1:
        return grad_fn(params, inputs, jax.random.fold_in(dropout_key, 0))

    micro = {name: _split_micro(x, k, mesh) for name, x in inputs.items()}

    def body(carry, xs):
        g_acc, s_acc = carry
        mb, j = xs
        g, s = grad_fn(params, mb, jax.random.fold_in(dropout_key, j))
        g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
        if param_shardings is not None:
            # Keep the accumulator laid out like the params (with FSDP: reduce-scattered).
            g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
        return (g_acc, {n: s_acc[n] + s[n] for n in SUM_KEYS}), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    zero_sums = {n: jnp.zeros((), jnp.float32) for n in SUM_KEYS}
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro, jnp.arange(k)))
    return grads, sums


def make_train_step(
    student_model: nn.Module,
    teacher_model: nn.Module | None,
    cfg: StepConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    rules: shd.Rules,
    state_shardings: TrainState,
    teacher_shardings: PyTree | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """The jitted update ``step(state, teacher_params, batch, token_weights) -> (new_state, metrics)``.

    state: a TrainState placed with ``state_shardings`` (from ``init_train_state``); DONATED.
    teacher_params: the teacher's params placed with ``teacher_shardings`` (``shard_teacher``), or
      None in MLM-only mode.
    batch: dict of global [B, T] int32 arrays over data x fsdp (``sharding.shard_batch``): input_ids,
      attention_mask (1 real, 0 pad), and optionally segment_ids / position_ids (packed rows).
      B must be a multiple of grad_accum_steps x data x fsdp.
    token_weights: [V] float32 masking weights (0 for special tokens), replicated.
    metrics: float32 scalars "loss", "loss_ce", "loss_mlm", "loss_cos", "loss_mse", "mlm_accuracy",
      "grad_norm" (before clipping), "param_norm", "lr" (of this update), "tokens" (real tokens),
      "masked_tokens".
    compiler_options: XLA options for this jit, e.g. {"xla_backend_optimization_level": 0} to
      compile faster (tests) at the cost of slower code.
    """
    _check_models(student_model, teacher_model, cfg)
    vocab = student_model.cfg.vocab_size
    frozen = tuple(dict.fromkeys(frozen_param_paths(student_model.cfg) + cfg.frozen))
    repl = shd.replicated(mesh)

    def train_step(state: TrainState, teacher_params, batch, token_weights):
        shd.check_batch(batch["input_ids"].shape[0], mesh, cfg.grad_accum_steps)
        with shd.activation_rules(mesh, rules):
            mask_key, dropout_key = jax.random.split(jax.random.fold_in(state.rng, state.step))
            # Named scopes label the compiled ops (profiles, benchmarks/trace_summary.py).
            with jax.named_scope("masking"):
                inputs, counts = mask_batch(batch, token_weights, mask_key, cfg, vocab)
            grads, sums = accumulate_grads(student_model, teacher_model, cfg, state.params, teacher_params,
                                           inputs, counts, dropout_key, mesh, state_shardings.params)
            _, metrics = combine_losses(sums, counts, cfg.loss)
            with jax.named_scope("optimizer"):
                updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
                params = optax.apply_updates(state.params, updates)
            metrics.update(
                grad_norm=trainable_global_norm(grads, frozen),
                param_norm=optax.tree.norm(params).astype(jnp.float32),
                lr=jnp.asarray(schedule(state.step), jnp.float32),
                tokens=counts["cos_rows"],
                masked_tokens=counts["mlm_rows"],
            )
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, teacher_shardings, shd.batch_sharding(mesh), repl),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )


def make_eval_step(
    model: nn.Module,
    cfg: StepConfig,
    mesh: Mesh,
    rules: shd.Rules,
    param_shardings: PyTree,
    baseline_id: int | None = None,
) -> Callable[..., dict[str, jax.Array]]:
    """Jitted ``eval_step(params, batch, token_weights, rng) -> sums`` (no dropout, no update).

    The batch is masked with ``rng`` (pass the same key every evaluation so scores are comparable).
    Returns float32 scalar sums that add up over batches: "mlm_sum", "mlm_rows", "mlm_correct",
    "tokens"; loss = mlm_sum / mlm_rows, accuracy = mlm_correct / mlm_rows. With ``baseline_id``
    (e.g. the most frequent token), also "baseline_correct": masked positions whose label it is.
    """
    vocab = model.cfg.vocab_size
    mlm_only = dataclasses.replace(cfg.loss, alpha_ce=0.0, alpha_cos=0.0, alpha_mse=0.0)

    def eval_step(params, batch, token_weights, rng):
        with shd.activation_rules(mesh, rules):
            if cfg.causal:  # next-token prediction on the text as it is
                masked_ids = batch["input_ids"]
                labels = causal_labels(masked_ids, batch["attention_mask"], batch.get("segment_ids"))
            else:
                masked_ids, labels = mask_tokens(rng, batch["input_ids"], batch["attention_mask"],
                                                 token_weights, cfg.mask_id, vocab, cfg.masking)
            v = {"params": split_params(params)[0]}
            hidden = model.apply(v, masked_ids, deterministic=True, method="encode",
                                 **_model_kwargs(batch)).last_hidden_state
            head = lambda h: model.apply(v, h, method="mlm_logits")  # noqa: E731
            max_rows = None if cfg.causal else max_masked_rows(masked_ids.shape[0], masked_ids.shape[1],
                                                               cfg.masking.mlm_mask_prop)
            sums = loss_sums(hidden, None, head, None, labels, batch["attention_mask"], mlm_only,
                             max_rows=max_rows)
            out = {"mlm_sum": sums["mlm_sum"], "mlm_rows": sums["mlm_rows"],
                   "mlm_correct": sums["mlm_correct"], "tokens": sums["cos_rows"]}
            if baseline_id is not None:
                out["baseline_correct"] = jnp.sum(labels == baseline_id, dtype=jnp.float32)
            return out

    repl = shd.replicated(mesh)
    return jax.jit(eval_step, in_shardings=(param_shardings, shd.batch_sharding(mesh), repl, repl),
                   out_shardings=repl)


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


def _boxed_state_fn(model: nn.Module, optimizer: optax.GradientTransformation,
                    sample_shape: tuple[int, int] = (1, 8), projection: tuple[int, int] | None = None):
    """rng -> TrainState whose params and AdamW moments keep their logical-axis boxes."""
    ids = jnp.zeros(sample_shape, jnp.int32)

    def boxed_state(rng):
        init_key, state_key = jax.random.split(rng)
        boxed = model.init(init_key, ids)["params"]
        if projection is not None:
            boxed = {**boxed, COS_PROJECTION: projection_params(
                jax.random.fold_in(init_key, 1), projection, model.cfg.initializer_range)}
        return TrainState(step=jnp.zeros((), jnp.int32), params=boxed, opt_state=optimizer.init(boxed),
                          rng=state_key)

    return boxed_state


def abstract_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules = shd.RULES,
    strict: bool = False,
    projection: tuple[int, int] | None = None,
) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, TrainState of NamedShardings), nothing allocated.

    ``jax.eval_shape`` of the boxed init: the shardings come from the logical axis names (params and
    AdamW moments carry them), the abstract arrays carry the shardings (restore targets).
    projection: (D_s, D_t) adds L_cos's projection to the params (``COS_PROJECTION``).
    """
    boxed = jax.eval_shape(_boxed_state_fn(model, optimizer, projection=projection), jax.random.PRNGKey(0))
    shardings = shd.logical_shardings(boxed, mesh, rules, strict)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nn.unbox(boxed),
                            shardings)
    return abstract, shardings


def init_train_state(
    model: nn.Module,
    rng: jax.Array,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules = shd.RULES,
    sample_shape: tuple[int, int] = (1, 8),
    params: PyTree | None = None,
    strict: bool = False,
    projection: tuple[int, int] | None = None,
) -> tuple[TrainState, TrainState]:
    """A TrainState born sharded, and its shardings (a TrainState of NamedShardings).

    rng: raw PRNG key; split into the params' init key and the state's base key.
    sample_shape: [B, T] of the dummy input that init traces (any small shape works).
    params: optional initial params (unboxed, e.g. a student extracted from the teacher); they are
      placed by the rules instead of being drawn at random; the optimizer state is still born sharded.
    projection: (D_s, D_t) of L_cos's projection, drawn from ``rng`` when ``params`` lack it.
    The shardings come from ``jax.eval_shape`` of the boxed init (params and AdamW moments carry the
    logical axis names), then ``jax.jit(init, out_shardings=...)`` creates every array in place.
    """
    boxed_state = _boxed_state_fn(model, optimizer, sample_shape, projection)
    shardings = shd.logical_shardings(jax.eval_shape(boxed_state, rng), mesh, rules, strict)
    if params is not None and projection is not None and COS_PROJECTION not in params:
        init_key = jax.random.split(rng)[0]
        params = {**params, COS_PROJECTION: projection_params(
            jax.random.fold_in(init_key, 1), projection, model.cfg.initializer_range, boxed=False)}

    if params is None:
        def init(rng):
            state = boxed_state(rng)
            return state.replace(params=nn.unbox(state.params), opt_state=nn.unbox(state.opt_state))

        return jax.jit(init, out_shardings=shardings)(rng), shardings

    params = jax.device_put(nn.unbox(params), shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    state_key = jax.random.split(rng)[1]
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params, opt_state=opt_state,
        rng=jax.device_put(state_key, shardings.rng),
    )
    return state, shardings


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
