"""The train state every run updates, born sharded: step, params, optimizer state, RNG, extra modules.

``TrainState.params`` are the model's parameters (what is exported); ``TrainState.extra`` holds the
trainable modules an objective adds beside the model (a projection of the student's hidden states
to the teacher's width, relation heads...), by name. Both train together: the optimizer sees one
tree, ``trainable(state) = {"model": params, "extra": extra}``, so clipping, moments and norms
cover both, and an objective with no extra module has ``extra = {}``.

Born sharded, as big_vision does it: ``jax.eval_shape`` of the boxed init gives every array's
logical axis names (params, extra modules and AdamW moments carry them), the rules table of
``jaxdistil.training.sharding`` turns them into shardings, and ``jax.jit(init, out_shardings=...)``
creates each array where it lives. ``abstract_train_state`` gives the same shardings without
allocating anything: the restore target of a checkpoint, on whatever mesh the run has now.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from jaxdistil.training import sharding as shd

PyTree = Any
# name -> rng -> boxed params (``nn.Partitioned`` leaves carrying logical axis names).
ExtraInit = Mapping[str, Callable[[jax.Array], PyTree]]


@struct.dataclass
class TrainState:
    """What the step updates. ``step``: int32 scalar, optimizer updates done; ``params``: the
    model's (unboxed) params; ``opt_state``: the optimizer's state over ``trainable``; ``rng``: base
    PRNG key (raw uint32 [2]); the key of update s is ``fold_in(rng, s)``, so a resumed run draws
    the same masks and dropout; ``extra``: the objective's trainable modules by name (not exported)."""

    step: jax.Array
    params: PyTree
    opt_state: PyTree
    rng: jax.Array
    extra: PyTree = struct.field(default_factory=dict)


def trainable(params: PyTree, extra: PyTree) -> dict[str, PyTree]:
    """The tree the optimizer updates: ``{"model": params, "extra": extra}``."""
    return {"model": params, "extra": extra}


def model_path(path: str) -> str:
    """A model parameter's path in the trainable tree (frozen paths are given in the model's terms)."""
    return f"model/{path}"


def base_rng(rng: jax.Array) -> jax.Array:
    """The TrainState's base key (``rng``) of a state initialised from ``rng`` (the init key is the
    other half); a teacher cache draws the run's masks from it (``jaxdistil.distill.teacher_cache``)."""
    return jax.random.split(rng)[1]


def step_key(rng: jax.Array, step: Any) -> jax.Array:
    """The key of update ``step``: fold_in(base key, step), so a resumed run draws the same masks."""
    return jax.random.fold_in(rng, step)


def _draw_extra(extra_init: ExtraInit, init_key: jax.Array) -> dict[str, PyTree]:
    # Module i (in name order) draws from fold_in(init_key, i + 1); the model uses init_key itself.
    return {name: extra_init[name](jax.random.fold_in(init_key, i + 1)) for i, name in enumerate(sorted(extra_init))}


def boxed_state_fn(model: nn.Module, optimizer: optax.GradientTransformation, extra_init: ExtraInit,
                   sample_shape: tuple[int, int] = (1, 8)) -> Callable[[jax.Array], TrainState]:
    """rng -> TrainState whose params, extra modules and optimizer moments keep their boxes."""
    ids = jnp.zeros(sample_shape, jnp.int32)

    def boxed_state(rng):
        init_key, state_key = jax.random.split(rng)[0], base_rng(rng)
        params = model.init(init_key, ids)["params"]
        extra = _draw_extra(extra_init, init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                          opt_state=optimizer.init(trainable(params, extra)), rng=state_key)

    return boxed_state


def abstract_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    rules: shd.Rules = shd.RULES,
    strict: bool = False,
    extra_init: ExtraInit | None = None,
) -> tuple[TrainState, TrainState]:
    """(abstract TrainState, TrainState of NamedShardings), nothing allocated.

    The abstract arrays carry their shardings (``jax.ShapeDtypeStruct(..., sharding=...)``): the
    restore target of a checkpoint onto this mesh.
    """
    boxed = jax.eval_shape(boxed_state_fn(model, optimizer, extra_init or {}), jax.random.PRNGKey(0))
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
    extra_init: ExtraInit | None = None,
) -> tuple[TrainState, TrainState]:
    """A TrainState born sharded, and its shardings (a TrainState of NamedShardings).

    rng: raw PRNG key, split into the params' init key and the state's base key.
    sample_shape: [B, T] of the dummy input that init traces (any small shape works).
    params: optional initial params (unboxed, e.g. a student copied from teacher layers), placed by
      the rules instead of drawn at random; the extra modules and optimizer state are still born
      sharded.
    extra_init: the objective's trainable modules (``ExtraInit``), drawn from ``rng``.
    """
    extra_init = extra_init or {}
    boxed_state = boxed_state_fn(model, optimizer, extra_init, sample_shape)
    shardings = shd.logical_shardings(jax.eval_shape(boxed_state, rng), mesh, rules, strict)

    if params is None:
        def init(rng):
            state = boxed_state(rng)
            return state.replace(params=nn.unbox(state.params), extra=nn.unbox(state.extra),
                                 opt_state=nn.unbox(state.opt_state))

        return jax.jit(init, out_shardings=shardings)(rng), shardings

    init_key, state_key = jax.random.split(rng)[0], base_rng(rng)
    params = jax.device_put(nn.unbox(params), shardings.params)
    extra = jax.jit(lambda k: nn.unbox(_draw_extra(extra_init, k)), out_shardings=shardings.extra)(init_key)
    opt_state = jax.jit(lambda p, e: optimizer.init(trainable(p, e)), out_shardings=shardings.opt_state)(
        params, extra)
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step), params=params, extra=extra,
        opt_state=opt_state, rng=jax.device_put(state_key, shardings.rng),
    )
    return state, shardings


def param_count(tree: PyTree) -> int:
    """Number of scalars in a tree of arrays (or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
