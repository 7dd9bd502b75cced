"""The step template: one donated, jitted update around an objective, and the jitted scoring steps.

Every run (distillation, MLM pre-training, fine-tuning, every later objective) is an ``Objective``:
a loss written as float32 SUMS over rows and the DENOMINATORS of its means, in three parts:

  prepare(batch, consts, key) -> (inputs, counts)   on the WHOLE batch, before any forward pass:
                                                    masking, row weights, the denominators
  sums(trainable, micro, consts, key) -> sums       one micro-batch: forward passes and loss sums
  combine(sums, counts) -> (total, metrics)         the means (sums / counts) and their weighted total

``make_train_step`` builds from it ``step(state, batch, consts) -> (new state, metrics)``:

  key      fold_in(state.rng, state.step): the same masks and dropout after a resume
  prepare  ``objective.prepare(batch, consts, key)``
  split    into k = grad_accum_steps micro-batches [k, B/k, ...], strided so that every device keeps
           its own rows (``split_micro``); ``lax.scan`` over them, micro-batch j with key
           fold_in(split(key)[1], j):
             grads of combine(sums of the micro-batch, counts of the WHOLE batch)
           since every mean is (sum over rows) / (rows of the whole batch), the k gradients add up
           to the gradient of one batch of k*b rows, exactly
  update   the optimizer on ``trainable(state)`` (the model's params and the objective's extra
           modules), frozen paths excluded
  metrics  the objective's means, and the norms of the gradients (before clipping), of the params
           and of the update, the learning rate; plus the raw ``sums`` and ``counts`` so that a
           logging interval of several steps divides its summed numerators by its summed
           denominators once (``jaxdistil.training.metrics.TrainLog``)

``consts`` are the inputs that do not train and do not change from step to step (a frozen teacher's
params, masking weights...): a pytree placed once, passed to every step. The state is donated. The
template knows nothing of distillation or classification; ``TrainStep`` bundles it with the mesh,
the rules, the optimizer and the born-sharded state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistil.errors import UserError
from jaxdistil.pytrees import path_str
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig, make_optimizer, trainable_global_norm
from jaxdistil.training.state import (
    ExtraInit,
    TrainState,
    abstract_train_state,
    init_train_state,
    model_path,
    step_key,
    trainable,
)

PyTree = Any
Metrics = dict[str, Any]


class Objective(Protocol):
    """What the step template is given (see the module doc).

    extra_init: the objective's own trainable modules (``jaxdistil.training.state.ExtraInit``).
    totals: logged totals of an interval, {log name: counts key} (e.g. {"tokens": "tokens"}).
    """

    extra_init: ExtraInit
    totals: Mapping[str, str]

    def prepare(self, batch: Mapping[str, jax.Array], consts: PyTree, key: jax.Array
                ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]: ...

    def sums(self, params: PyTree, micro: Mapping[str, jax.Array], consts: PyTree, key: jax.Array
             ) -> dict[str, jax.Array]: ...

    def combine(self, sums: Mapping[str, Any], counts: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]: ...


def split_micro(x: jax.Array, k: int, mesh: Mesh | None) -> jax.Array:
    """[B, ...] -> [k, B/k, ...], micro-batch j = rows j, j+k, ... (strided).

    Strided, not contiguous: the batch rows are split in contiguous blocks over data x fsdp, so the
    reshape [B] -> [B/k, k] keeps each device's rows on that device and the scan needs no transfer.
    """
    y = x.reshape((x.shape[0] // k, k) + x.shape[1:]).swapaxes(0, 1)
    if mesh is None:
        return y
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, shd.BATCH_AXES)))


def accumulate_grads(objective: Objective, params: PyTree, inputs: Mapping[str, jax.Array],
                     counts: Mapping[str, jax.Array], consts: PyTree, key: jax.Array, k: int,
                     mesh: Mesh | None = None, param_shardings: PyTree | None = None
                     ) -> tuple[PyTree, dict[str, jax.Array]]:
    """Gradient of the whole batch's total loss and the whole batch's sums, over ``k`` micro-batches.

    params: the trainable tree; inputs: ``prepare``'s [B, ...] arrays (B a multiple of k); counts:
    the whole batch's denominators; key: micro-batch j uses fold_in(key, j).
    """
    batch = jax.tree.leaves(inputs)[0].shape[0]
    if batch % k:
        raise UserError(f"batch size {batch} is not a multiple of grad_accum_steps={k}")

    def loss_fn(p, micro, micro_key):
        sums = objective.sums(p, micro, consts, micro_key)
        total, _ = objective.combine(sums, counts)
        return total, sums

    grad_fn = jax.grad(loss_fn, has_aux=True)
    if k == 1:
        return grad_fn(params, inputs, jax.random.fold_in(key, 0))

    micro = {name: split_micro(x, k, mesh) for name, x in inputs.items()}

    def body(carry, xs):
        g_acc, s_acc = carry
        mb, j = xs
        g, s = grad_fn(params, mb, jax.random.fold_in(key, j))
        g_acc = jax.tree_util.tree_map(jnp.add, g_acc, g)
        if param_shardings is not None:
            # Keep the accumulator laid out like the params (with FSDP: reduce-scattered).
            g_acc = jax.lax.with_sharding_constraint(g_acc, param_shardings)
        return (g_acc, {n: s_acc[n] + s[n] for n in s_acc}), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), key)[1])
    zero_sums = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}
    (grads, sums), _ = jax.lax.scan(body, (zeros, zero_sums), (micro, jnp.arange(k)))
    return grads, sums


def make_train_step(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    rules: shd.Rules,
    state_shardings: TrainState,
    const_shardings: PyTree = None,
    grad_accum_steps: int = 1,
    frozen: Sequence[str] = (),
    compiler_options: Mapping[str, Any] | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], PyTree], tuple[TrainState, Metrics]]:
    """The jitted update ``step(state, batch, consts) -> (new_state, metrics)`` (see the module doc).

    state: placed with ``state_shardings``; DONATED. batch: dict of global [B, ...] arrays over
    data x fsdp (``sharding.shard_batch``), B a multiple of grad_accum_steps x data x fsdp.
    consts: placed with ``const_shardings``. frozen: paths of the trainable tree with no update
    (left out of the gradient norm). metrics: float32 scalars, plus "sums" and "counts" dicts.
    compiler_options: XLA options for this jit, e.g. {"xla_backend_optimization_level": 0} to
    compile faster (tests) at the cost of slower code.
    """
    frozen = tuple(frozen)
    repl = shd.replicated(mesh)
    trainable_shardings = trainable(state_shardings.params, state_shardings.extra)

    def train_step(state: TrainState, batch, consts):
        shd.check_batch(jax.tree.leaves(batch)[0].shape[0], mesh, grad_accum_steps)
        with shd.activation_rules(mesh, rules):
            key = step_key(state.rng, state.step)
            inputs, counts = objective.prepare(batch, consts, key)
            params = trainable(state.params, state.extra)
            grads, sums = accumulate_grads(objective, params, inputs, counts, consts, jax.random.split(key)[1],
                                           grad_accum_steps, mesh, trainable_shardings)
            _, metrics = objective.combine(sums, counts)
            # Named scopes label the compiled ops (profiles, benchmarks/trace_summary.py).
            with jax.named_scope("optimizer"):
                updates, opt_state = optimizer.update(grads, state.opt_state, params)
                new = optax.apply_updates(params, updates)
            metrics.update(
                grad_norm=trainable_global_norm(grads, frozen),
                param_norm=optax.tree.norm(new).astype(jnp.float32),
                update_norm=optax.tree.norm(updates).astype(jnp.float32),
                lr=jnp.asarray(schedule(state.step), jnp.float32),
                sums=sums, counts=counts,
            )
            new_state = state.replace(step=state.step + 1, params=new["model"], extra=new["extra"],
                                      opt_state=opt_state)
            return new_state, metrics

    return jax.jit(
        train_step,
        in_shardings=(state_shardings, shd.batch_sharding(mesh), const_shardings),
        out_shardings=(state_shardings, repl),
        donate_argnums=(0,),
        compiler_options=dict(compiler_options) if compiler_options else None,
    )


def make_eval_step(fn: Callable[..., Any], mesh: Mesh, rules: shd.Rules, in_shardings: Sequence[Any]
                   ) -> Callable[..., Any]:
    """``jax.jit(fn)`` under the activation rules, its outputs replicated: the scoring steps
    (held-out MLM sums, a classifier's logits). in_shardings: one per argument of ``fn``."""

    def step(*args):
        with shd.activation_rules(mesh, rules):
            return fn(*args)

    return jax.jit(step, in_shardings=tuple(in_shardings), out_shardings=shd.replicated(mesh))


class TrainStep:
    """The template built on a mesh: optimizer, born-sharded state, the jitted update.

      model, objective, optim    the module whose params train, its objective, AdamW settings
                                 (``optim.total_steps`` set, ``optim.grad_accum_steps`` micro-batches)
      mesh, rules                the device mesh and the logical-axis rules table
      frozen                     paths of the model's params that get no update
      const_shardings            shardings of the step's ``consts`` (None: as they are placed)

      .optimizer, .schedule, .abstract_state, .state_shardings, .train_step(state, batch, consts)
      .init_state(rng, params=None), .shard_batch(host_batch), .replicate(value)
    """

    def __init__(self, model: nn.Module, objective: Objective, optim: OptimConfig, mesh: Mesh, rules: shd.Rules,
                 frozen: Sequence[str] = (), const_shardings: PyTree = None, strict: bool = False,
                 compiler_options: Mapping[str, Any] | None = None):
        self.model, self.objective, self.mesh, self.rules, self.strict = model, objective, mesh, rules, strict
        self.frozen = tuple(model_path(p) for p in dict.fromkeys(frozen))
        self.optimizer, self.schedule = make_optimizer(optim, frozen=self.frozen)
        self.abstract_state, self.state_shardings = abstract_train_state(
            model, self.optimizer, mesh, rules, strict, objective.extra_init)
        paths = {path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainable(self.abstract_state.params, {}))}
        missing = [p for p in self.frozen if p not in paths]
        if missing:
            raise UserError(f"frozen parameter {missing[0].removeprefix('model/')} is not in the model's params; "
                            "check the model config")
        self.train_step = make_train_step(objective, self.optimizer, self.schedule, mesh, rules,
                                          self.state_shardings, const_shardings, optim.grad_accum_steps,
                                          self.frozen, compiler_options)

    def init_state(self, rng: jax.Array, params: PyTree | None = None) -> TrainState:
        """The initial TrainState, born sharded: ``params`` placed by the rules (e.g. a student
        copied from teacher layers) or drawn at random from ``rng``; extra modules drawn from ``rng``."""
        state, _ = init_train_state(self.model, rng, self.optimizer, self.mesh, self.rules, params=params,
                                    strict=self.strict, extra_init=self.objective.extra_init)
        return state

    def shard_batch(self, host_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        return shd.shard_batch(host_batch, self.mesh)

    def replicate(self, value: Any) -> jax.Array:
        return jax.device_put(value, shd.replicated(self.mesh))
