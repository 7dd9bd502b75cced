"""The optimizer of every run: AdamW with the reference's recipe, as one optax chain.

Where it sits in the flow of one batch:
  loader -> objective (masking, forward passes, losses) -> grads -> **update** -> metrics.
The step template (``jaxdistil.training.step``) hands the gradients of the trainable tree
(``jaxdistil.training.state.trainable``: the model's params and the objective's extra modules) to
the transformation built here, which turns them into updates:

  grads --(frozen params: zeroed)--> clip by global norm (max_grad_norm)
        --> Adam moments (b1, b2, eps) --> + weight_decay * params (not biases, not LayerNorms)
        --> * -learning_rate(step)   (linear warm-up over warmup_prop * total_steps, linear decay to 0)

This is PyTorch's ``AdamW`` + ``clip_grad_norm_`` + ``get_linear_schedule_with_warmup`` as the
reference ``distiller.py`` and transformers' ``run_glue`` use them: decoupled weight decay
(``p -= lr * wd * p``), eps added to ``sqrt(v_hat)``, and a learning rate of ``lr * s / warmup`` at
update ``s`` (0 at the first update). The reference's no-decay list (``bias``, ``LayerNorm.weight``)
misses DistilBERT's ``sa_layer_norm`` / ``output_layer_norm`` / ``vocab_layer_norm`` weights; we
exempt every LayerNorm, as intended (the recipe's weight decay is 0.0, so results do not change).

Frozen parameters (``frozen``: ``/``-joined paths in the tree the optimizer is given, e.g. a
DistilBERT's sinusoidal position table) get zero updates and are left out of the gradient norm, as
``requires_grad=False`` does in PyTorch. Gradient accumulation happens in the step, not here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxdistil.errors import UserError
from jaxdistil.pytrees import path_str

PyTree = Any


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and schedule knobs (the reference's defaults).

    learning_rate: peak learning rate, reached at the end of the warm-up.
    b1, b2, eps: Adam's moment decays and denominator epsilon.
    weight_decay: decoupled decay on weights (never on biases or LayerNorm parameters).
    max_grad_norm: clip the global gradient norm to this (0 or less: no clipping).
    warmup_prop: fraction of total_steps spent warming up linearly from 0.
    total_steps: number of optimizer updates of the run (the schedule reaches 0 there); must be set.
    grad_accum_steps: micro-batches per update (the step splits each batch into that many).
    """

    learning_rate: float = 5e-4
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-6
    weight_decay: float = 0.0
    max_grad_norm: float = 5.0
    warmup_prop: float = 0.05
    total_steps: int = 0
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        if self.learning_rate < 0:
            raise UserError(f"optim.learning_rate must be >= 0, got {self.learning_rate}")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise UserError(f"optim.b1 and optim.b2 must be in [0, 1), got {self.b1}, {self.b2}")
        if self.eps <= 0:
            raise UserError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise UserError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.warmup_prop <= 1.0:
            raise UserError(f"optim.warmup_prop must be in [0, 1], got {self.warmup_prop}")
        if self.total_steps < 0:
            raise UserError(f"optim.total_steps must be >= 1, got {self.total_steps}")
        if self.grad_accum_steps < 1:
            raise UserError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")

    @property
    def warmup_steps(self) -> int:
        # The reference rounds up: math.ceil(num_train_optimization_steps * warmup_prop).
        return math.ceil(self.total_steps * self.warmup_prop)


def make_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Learning rate at update ``count`` (0-based): ``lr * count / W`` for ``count < W``, then
    ``lr * (total - count) / (total - W)`` down to 0 at ``total`` (and 0 after)."""
    if cfg.total_steps < 1:
        raise UserError("optim.total_steps is not set; give the number of optimizer updates (>= 1)")
    warmup = min(cfg.warmup_steps, cfg.total_steps)
    if warmup == cfg.total_steps:  # all warm-up: 0 from then on, as transformers' max(1, total - warmup)
        decay = optax.constant_schedule(0.0)
    else:
        decay = optax.linear_schedule(cfg.learning_rate, 0.0, cfg.total_steps - warmup)
    if warmup == 0:
        return decay
    rise = optax.linear_schedule(0.0, cfg.learning_rate, warmup)
    return optax.join_schedules([rise, decay], [warmup])


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def map_params(fn: Callable[[str, Any], Any], params: PyTree) -> PyTree:
    """``fn(path, leaf)`` over a param tree, boxed (``nn.Partitioned``) or not; a box counts as a
    leaf, so the result is a prefix of the boxed tree and matches the unboxed one."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_str(p), x), params, is_leaf=_is_box)


def is_no_decay(path: str) -> bool:
    """Biases and LayerNorm scales/biases (every module whose name ends in ``norm``)."""
    parts = path.split("/")
    return parts[-1] == "bias" or (len(parts) > 1 and parts[-2].lower().endswith("norm"))


def decay_mask(params: PyTree) -> PyTree:
    """True where weight decay applies (bool tree matching ``params``)."""
    return map_params(lambda path, _: not is_no_decay(path), params)


def trainable_mask(params: PyTree, frozen: tuple[str, ...] = ()) -> PyTree:
    """True for parameters that train, False for the ``frozen`` paths."""
    return map_params(lambda path, _: path not in frozen, params)


def make_optimizer(
    cfg: OptimConfig, params: PyTree | None = None, frozen: tuple[str, ...] = (),
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + clipping + warm-up/decay schedule; returns ``(transformation, schedule)``.

    params: the tree the optimizer will update (boxed or not, arrays or ShapeDtypeStructs); when
      given, the frozen paths are checked to exist in it.
    frozen: paths of that tree that must not train: zero updates, no Adam moments, left out of the
      clipping norm.
    ``schedule(count)`` is the learning rate of update ``count`` (for logging: ``schedule(state.step)``).
    The transformation's ``init`` works on boxed params too, so ``jax.eval_shape(tx.init, boxed)``
    gives an optimizer state whose moments carry the params' logical axis names (for sharding).
    """
    schedule = make_schedule(cfg)
    frozen = tuple(dict.fromkeys(frozen))
    if params is not None and frozen:
        paths = set(jax.tree_util.tree_leaves(map_params(lambda path, _: path, params)))
        missing = [p for p in frozen if p not in paths]
        if missing:
            raise UserError(
                f"frozen parameter {missing[0]} is not in the model's params; check the model config")

    parts = []
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    if cfg.weight_decay > 0:
        parts.append(optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask))
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    if frozen:
        # multi_transform hides the frozen leaves from the AdamW chain (so they count neither in the
        # clipping norm nor in the moments) and zeroes their updates.
        def labels(p: PyTree) -> PyTree:
            return map_params(lambda path, _: "frozen" if path in frozen else "train", p)

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule


def trainable_global_norm(grads: PyTree, frozen: tuple[str, ...] = ()) -> jax.Array:
    """Global L2 norm of the gradients of the trainable params (what the clipping sees); fp32 scalar."""
    mask = trainable_mask(grads, frozen)
    kept = jax.tree_util.tree_map(lambda m, g: g if m else jnp.zeros((), g.dtype), mask, grads)
    return optax.tree.norm(kept).astype(jnp.float32)
