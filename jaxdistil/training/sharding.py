"""Parallelism as configuration: a (data, fsdp, tensor) device mesh and ONE logical-axis rules table.

Where it sits in the flow of one batch:
  loader -> (batch placed over data x fsdp) -> masking -> teacher -> student -> losses -> grads ->
  update -> metrics.
The models never name a mesh: every parameter carries logical axis names (``vocab``, ``embed``,
``heads``, ``mlp``, ...) and the activations are constrained with ``activation_*`` names. ``RULES``
maps both to mesh axes:

  data    pure data parallelism: batch rows split, params replicated, gradients all-reduced.
  fsdp    batch rows split too, and parameters + optimizer state split on their ``embed`` dim
          (ZeRO-3 / FSDP: each layer's weights are all-gathered when used).
  tensor  Megatron-style: attention heads, the FFN width and the vocabulary split; the batch is not.

The same table shards the student's params, its AdamW moments, and the frozen teacher's params, so
``jax.jit`` with these shardings places every array once, where it lives (params are born sharded:
``jax.jit(init, out_shardings=...)``, never built on one device and moved).

A dimension that does not divide evenly by the mesh axes its rule maps it to (e.g. bert-base's
vocabulary of 30522 over tensor=4) is REPLICATED along that dimension with a warning by default;
``strict=True`` raises a one-line UserError naming the parameter, axis and sizes instead. The batch
is never silently replicated: a batch size that is not a multiple of data x fsdp is an error.

Rules can be overridden from the config (``mesh.rules: ["mlp=tensor", "embed=none"]`` or a dict
``{"mlp": "tensor"}``), which is how the shard-study tool compares layouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistil.errors import UserError
from jaxdistil.pytrees import path_str

PyTree = Any
MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes, in priority order (flax semantics: for each array, a rule applies to the
# first dimension with that name if none of its mesh axes is already used by another dimension).
RULES: Rules = (
    # Activations [B, T, D] / [B, T, F]: batch rows over data x fsdp; the FFN width over tensor.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    # Parameters. Tensor parallel splits what is per-head, per-FFN-unit or per-vocab-entry.
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    # FSDP splits the model width, present in every matrix (and in the biases of out_lin/lin2).
    ("embed", "fsdp"),
    # Small or awkward dims stay whole: per-head width, positions, token types, the MLM transform's
    # output, the labels of a classifier, the teacher's width in L_cos's projection, LayerNorm
    # vectors, and the stacked-layers axis (scanned over).
    ("kv", None),
    ("position", None),
    ("token_type", None),
    ("transform", None),
    ("labels", None),
    ("teacher_embed", None),  # the teacher's width in L_cos's projection (loss.cos_projection)
    ("norm", None),
    ("layers", None),
)

LOGICAL_AXES = tuple(dict.fromkeys(name for name, _ in RULES))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; ``-1`` takes the devices left over (at most one axis).

    data: data-parallel replicas. fsdp: fully-sharded data parallel (params split too).
    tensor: tensor (model) parallel. rules: overrides of the logical-axis table, e.g. ("mlp=tensor",).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sizes = self.sizes()
        for name, size in sizes.items():
            if size == 0 or size < -1:
                raise UserError(f"mesh.{name} must be a positive size or -1 (the rest), got {size}")
        if sum(size == -1 for size in sizes.values()) > 1:
            raise UserError(f"only one mesh axis may be -1 (the rest of the devices), got {sizes}")

    def sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}

    @classmethod
    def parse(cls, text: str, rules: tuple[str, ...] = ()) -> MeshConfig:
        """``"data=2,fsdp=2,tensor=2"`` -> MeshConfig. Axes left out are 1, except ``data``, which
        takes the devices left over (-1): ``"fsdp=4"`` on 8 devices is data=2 x fsdp=4."""
        sizes = {"data": -1, "fsdp": 1, "tensor": 1}
        seen = set()
        for part in filter(None, (p.strip() for p in text.replace(" ", "").split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in MESH_AXES:
                raise UserError(
                    f"mesh {text!r}: {part!r} is not axis=size with axis one of {', '.join(MESH_AXES)} "
                    "(e.g. data=2,fsdp=2,tensor=2)")
            if key in seen:
                raise UserError(f"mesh {text!r}: axis {key} given twice")
            seen.add(key)
            try:
                sizes[key] = int(value)
            except ValueError:
                raise UserError(f"mesh {text!r}: size of {key} must be an integer, got {value!r}") from None
            if sizes[key] == 0 or sizes[key] < -1:
                raise UserError(f"mesh {text!r}: size of {key} must be positive or -1 (the rest), got {value}")
        if not seen:
            raise UserError(f"mesh {text!r} names no axis; write e.g. data=8 or data=2,fsdp=2,tensor=2")
        if sum(v == -1 for v in sizes.values()) > 1:
            raise UserError(f"mesh {text!r}: only one axis may be -1 (the rest of the devices)")
        return cls(**sizes, rules=tuple(rules))

    def resolve(self, n_devices: int, label: str = "") -> dict[str, int]:
        """The sizes on ``n_devices``: the -1 axis filled in, the product checked (one-line UserError)."""
        out = self.sizes()
        label = label or ",".join(f"{k}={v}" for k, v in out.items() if v != 1)
        fixed = math.prod(v for v in out.values() if v != -1)
        free = [k for k, v in out.items() if v == -1]
        factors = [f"{k}={v}" for k, v in out.items() if v not in (-1, 1)]
        parts = " x ".join(factors) + (f" = {fixed}" if len(factors) > 1 else "") if factors else "all axes 1"
        if free:
            if n_devices % fixed:
                raise UserError(
                    f"mesh {label}: {parts} does not divide the {n_devices} devices "
                    f"({free[0]} takes the rest); use sizes whose product divides {n_devices}")
            out[free[0]] = n_devices // fixed
        elif fixed != n_devices:
            raise UserError(
                f"mesh {label}: {parts} devices but {n_devices} are available; "
                f"make the product {n_devices} or set one axis to -1 (data takes the rest)")
        return out


def mesh_label(sizes: Mapping[str, int]) -> str:
    """A mesh's short name: the axes larger than 1 (``data=2,fsdp=4``), or ``data=1``."""
    parts = [f"{k}={sizes[k]}" for k in MESH_AXES if sizes.get(k, 1) > 1]
    return ",".join(parts) or "data=1"


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``Mesh`` with axes (data, fsdp, tensor) over ``devices`` (default: all devices).

    Raises UserError when the sizes do not multiply to the device count.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    # Auto axes: jit/GSPMD propagates shardings from the in/out shardings and logical constraints.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def _parse_axes(value: Any, where: str) -> MeshAxes:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().strip("()[]").replace(" ", "")
        if text.lower() in ("", "none", "null", "replicated"):
            return None
        names = tuple(t for t in text.split(",") if t)
    elif isinstance(value, Iterable):
        names = tuple(value)
    else:
        raise UserError(f"{where}: mesh axes must be a name, a list of names or none, got {value!r}")
    for name in names:
        if name not in MESH_AXES:
            raise UserError(f"{where}: unknown mesh axis {name!r}; use one of {', '.join(MESH_AXES)} or none")
    if len(set(names)) != len(names):
        raise UserError(f"{where}: mesh axis repeated in {value!r}")
    return names[0] if len(names) == 1 else names


def make_rules(overrides: Mapping[str, Any] | Iterable[str] | None = None, base: Rules = RULES) -> Rules:
    """The rules table with overrides applied.

    overrides: ``{"mlp": "tensor", "embed": None}`` or strings ``"mlp=tensor"`` /
      ``"rules.embed=fsdp,tensor"`` / ``"vocab=none"``. An override replaces every rule of that
      logical axis, in its place in the priority order.
    """
    if not overrides:
        return tuple(base)
    if isinstance(overrides, Mapping):
        items = [(str(k), v, f"rule {k!r}") for k, v in overrides.items()]
    else:
        items = []
        for text in overrides:
            if not isinstance(text, str) or "=" not in text:
                raise UserError(f"rule override {text!r} is not of the form name=mesh_axes (e.g. mlp=tensor)")
            key, value = text.split("=", 1)
            key = key.strip().removeprefix("mesh.").removeprefix("rules.")
            items.append((key, value, f"rule override {text!r}"))
    rules = list(base)
    for key, value, where in items:
        if key not in LOGICAL_AXES:
            raise UserError(f"{where}: unknown logical axis {key!r}; known: {', '.join(LOGICAL_AXES)}")
        axes = _parse_axes(value, where)
        first = next(i for i, (name, _) in enumerate(rules) if name == key)
        rules = [r for r in rules if r[0] != key]
        rules.insert(first, (key, axes))
    return tuple(rules)


def _axes_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[name] for name in names)


def _fmt_axes(axes: MeshAxes) -> str:
    return axes if isinstance(axes, str) else "x".join(axes)


def logical_shardings(
    boxed_tree: PyTree, mesh: Mesh, rules: Rules = RULES, strict: bool = False
) -> PyTree:
    """NamedShardings for a tree whose leaves carry logical axis names (``nn.Partitioned`` boxes).

    boxed_tree: params from ``init_params(model, rng, boxed=True)``, their ``jax.eval_shape``, or an
      optimizer state initialised on boxed params; unboxed leaves (step counters...) are replicated.
    Returns a tree shaped like the UNBOXED tree, one NamedSharding per array.
    A dimension that its rule's mesh axes do not divide is replicated with a warning, or raises a
    UserError with ``strict=True``.
    """
    rules = tuple(rules)

    def one(path, leaf):
        if isinstance(leaf, nn.meta.AxisMetadata):
            names = tuple(leaf.names)
            shape = tuple(leaf.value.shape)
        else:
            return NamedSharding(mesh, P())
        spec = list(nn.logical_to_mesh_axes(names, rules))
        for dim, (axes, size, name) in enumerate(zip(spec, shape, names)):
            n = _axes_size(mesh, axes)
            if size % n:
                msg = (f"{path_str(path)}: dim {dim} ({name}) of size {size} does not divide by mesh "
                       f"{_fmt_axes(axes)}={n}")
                if strict:
                    raise UserError(f"{msg}; change the mesh sizes or the rule for {name!r}")
                warnings.warn(f"{msg}; that dim is replicated", stacklevel=3)
                spec[dim] = None
        return NamedSharding(mesh, P(*spec))

    return jax.tree_util.tree_map_with_path(
        one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def param_shardings(
    model: nn.Module, mesh: Mesh, rules: Rules = RULES, sample_shape: tuple[int, int] = (1, 8),
    strict: bool = False,
) -> PyTree:
    """Shardings of a model's (unboxed) param tree, from its abstract boxed init (nothing is built)."""
    abstract = jax.eval_shape(
        lambda rng: model.init(rng, np.zeros(sample_shape, np.int32))["params"], jax.random.PRNGKey(0)
    )
    return logical_shardings(abstract, mesh, rules, strict)


def opt_state_shardings(
    optimizer: Any, boxed_params: PyTree, mesh: Mesh, rules: Rules = RULES, strict: bool = False
) -> PyTree:
    """Shardings of ``optimizer.init(params)``: the moments follow their params' rules (init runs
    abstractly on the boxed params, so the moments keep the boxes); counters are replicated."""
    abstract = jax.eval_shape(optimizer.init, boxed_params)
    return logical_shardings(abstract, mesh, rules, strict)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays [B, ...]: rows split over data x fsdp, replicated over tensor."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
    """How many shards the batch rows are split into (data x fsdp)."""
    return _axes_size(mesh, BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh, micro_batches: int = 1) -> None:
    """UserError unless every micro-batch splits evenly over data x fsdp."""
    n = batch_divisor(mesh)
    if batch_size % (n * micro_batches):
        raise UserError(
            f"batch size {batch_size} does not split into {micro_batches} micro-batch(es) over mesh "
            f"data x fsdp = {n}; use a multiple of {n * micro_batches}"
        )


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Places a host batch (dict of [B, ...] numpy arrays, this process's rows) on the mesh.

    Each process passes its own rows; the result is one global array per key (rows of all
    processes, split over data x fsdp). Explicit, so it works under ``jax_transfer_guard``.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        check_batch(value.shape[0] * jax.process_count(), mesh)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def shard_params(params: PyTree, shardings: PyTree) -> PyTree:
    """``jax.device_put`` of an unboxed param tree (e.g. the teacher's) onto its shardings."""
    return jax.device_put(nn.unbox(params), shardings)


def describe(shardings: PyTree) -> str:
    """One line per array: path and PartitionSpec (for logs and the shard-study tool)."""
    lines = []
    for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]:
        lines.append(f"{path_str(path)}: {s.spec}")
    return "\n".join(lines)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules = RULES):
    """Makes the models' ``nn.with_logical_constraint(x, ("activation_batch", ...))`` calls bind to
    ``mesh`` through ``rules``; enter it inside the jitted function (it only matters while tracing)."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(tuple(rules)):
        yield
