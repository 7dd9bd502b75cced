"""What a compiled step costs (jaxdistil.study.cost, the HLO readers of jaxdistil.study.hlo): replica
groups in XLA's three printed forms, and on real compiled distillation steps the FLOPs against the
closed-form model of ``jaxdistil.models.flops`` and the collective bytes against the closed forms of
data parallelism, FSDP and tensor parallelism, computed here from the parameter shapes and their
shardings (never from the program)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest
import tiny
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistil.distill.builder import DistillStep, StepSpec
from jaxdistil.distill.losses import LossConfig
from jaxdistil.distill.objective import StepConfig
from jaxdistil.models.flops import train_flops_per_token
from jaxdistil.pytrees import path_str
from jaxdistil.study import cost as costlib
from jaxdistil.study import hlo, memory
from jaxdistil.study import study as st
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig

# --------------------------------------------------------------------------------------------------
# Replica groups (synthetic attribute texts; expected groups worked out by hand)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tail, groups", [
    ("replica_groups={{0,1},{2,3}}, to_apply=%add", [[0, 1], [2, 3]]),
    ("replica_groups=[4,2]<=[8], dimensions={0}", [[0, 1], [2, 3], [4, 5], [6, 7]]),
    # iota(8) as [4,2], transposed: 0 2 4 6 1 3 5 7
    ("replica_groups=[4,2]<=[4,2]T(1,0), to_apply", [[0, 2], [4, 6], [1, 3], [5, 7]]),
    # devices [[0,1,2,3],[4,5,6,7]], groups along axis_0
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, use_global_device_ids=true",
     [[0, 4], [1, 5], [2, 6], [3, 7]]),
    # device order iota([2,2,2]).T(1,0,2) = 0 1 4 5 2 3 6 7, as [2,4]: [[0,1,4,5],[2,3,6,7]]
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_0'}, dimensions={0}",
     [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0','axis_1'}", [list(range(8))]),
    # a sub-axis: 'a' of 8 split as [pre 2, size 2, rest 2], grouped over the middle factor
    ("replica_groups=mesh['a'=8] {'a':(2)2}", [[0, 2], [1, 3], [4, 6], [5, 7]]),
    ("source_target_pairs={{0,1},{1,0},{2,2}}, channel_id=3", [[0, 1], [1, 0]]),
    ("channel_id=3, to_apply=%add", None),
])
def test_replica_groups(tail, groups):
    assert hlo.replica_groups(tail) == groups


def test_groups_name_the_mesh_axes_xla_reduced_over():
    """Whatever form this XLA prints, the groups of a psum over one named axis of a real compiled
    program vary along that axis only."""
    mesh = jax.make_mesh((2, 4), ("a", "b"))
    x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("a", "b")))
    for axis, expected in (("a", ("data",)), ("b", ("fsdp",))):
        f = jax.jit(jax.shard_map(lambda v, axis=axis: jax.lax.psum(v, axis), mesh=mesh, in_specs=P("a", "b"),
                                  out_specs=P("a", "b")))
        stats = hlo.collective_stats(f.lower(x).compile().as_text())
        (op,) = [o for o in stats.ops if o["kind"] == "all-reduce"]
        assert op["group_size"] == mesh.shape[axis]
        # the mesh ("a", "b") read as the study's (data, fsdp)
        assert costlib.axes_of(op["groups"], {"data": 2, "fsdp": 4}) == expected


def test_wire_factors_and_sliced_all_reduce():
    assert costlib.wire_factor("all-reduce", 8) == 2 * 7 / 8
    assert costlib.wire_factor("all-gather", 4) == 3 / 4 and costlib.wire_factor("reduce-scatter", 4) == 3
    assert costlib.wire_factor("all-reduce", 1) == 0
    c = costlib.Collective("all-reduce", "ar", bytes=1000, executions=3, group_size=8, axes=("fsdp",), groups=None,
                           sliced_bytes=800)
    assert c.wire_bytes() == 3 * 1.75 * 1000
    # 200 bytes all-reduced, 800 reduce-scattered to 100 per device: (n-1) x 100
    assert c.wire_bytes(reduce_scatter=True) == pytest.approx(3 * (1.75 * 200 + 7 * 100))


# --------------------------------------------------------------------------------------------------
# Real compiled steps (compiled only: abstract arguments, nothing placed)
# --------------------------------------------------------------------------------------------------

B, T = 16, 16
# Three student and four teacher layers: the layer stacks run as loops whose trip counts the
# readers must multiply in.
STUDENT = tiny.student_cfg(n_layers=3)
TEACHER = tiny.teacher_cfg(num_hidden_layers=4)


def _compile(mesh: str, loss: LossConfig | None = None, accum: int = 1, batch: int = B, seq: int = T):
    cfg = StepConfig(loss=loss or LossConfig(), optim=OptimConfig(total_steps=10, grad_accum_steps=accum), mask_id=tiny.MASK_ID)
    spec = StepSpec(STUDENT, TEACHER, cfg, shd.MeshConfig.parse(mesh))
    devices = jax.devices()[:1] if mesh == "data=1" else jax.devices()
    built = DistillStep(spec, devices)
    setup = st.StudySetup(spec=spec, batch=batch, seq=seq)
    state, teacher, batch_args, consts = st.abstract_arguments(built, setup)
    compiled = built.train_step.lower(state, batch_args, consts).compile(compiler_options=tiny.FAST_COMPILE)
    text = compiled.as_text()
    return costlib.step_cost(text, built.mesh.shape, memory.memory_analysis(compiled)), state, teacher, text


@pytest.fixture(scope="module")
def steps():
    return {mesh: _compile(mesh) for mesh in ("data=8", "fsdp=8", "tensor=8")}


def _bytes(tree, keep=lambda path, leaf: True) -> int:
    """float32 bytes of the leaves of an abstract param tree that ``keep(path, leaf)`` selects."""
    return sum(4 * math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
               if keep(path_str(path), leaf))


def _on_fsdp(path, leaf) -> bool:
    return "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec))


def _on_axis(cost: costlib.StepCost, axes: tuple[str, ...], kind: str) -> float:
    return sum(c.wire_bytes() for c in cost.collectives if c.axes == axes and c.kind == kind)


def _result_bytes(cost, axes, kind) -> int:
    return sum(c.bytes * c.executions for c in cost.collectives if c.axes == axes and c.kind == kind)


@pytest.mark.slow
def test_data_parallel_all_reduce_is_2G(steps):
    """data=8: the gradients G are all-reduced once, 2 G (n-1)/n bytes on each device's wire.

    G = float32 bytes of every student parameter, with the tied word embedding counted twice: its
    two gradient contributions (the input lookup and the MLM projection) are reduced separately and
    added after. The same all-reduce carries the four loss sums of the step (4 float32 scalars),
    and the masking adds its counts (4 + 12 bytes) and gathers the [B, T] float32 scores of the
    global top-k (B T 4 bytes). Nothing else crosses devices: the params are replicated.
    """
    cost, state, _, _ = steps["data=8"]
    n = 8
    vocab_table = 4 * STUDENT.vocab_size * STUDENT.dim
    grads = _bytes(state.params) + vocab_table
    assert _result_bytes(cost, ("data",), "all-reduce") == grads + 16 + 16
    assert _on_axis(cost, ("data",), "all-reduce") == pytest.approx(2 * (n - 1) / n * grads, rel=0.01)
    assert _result_bytes(cost, ("data",), "all-gather") == 4 * B * T
    assert {c.axes for c in cost.collectives} == {("data",)}


@pytest.mark.slow
def test_fsdp_gathers_P_per_pass_and_reduce_scatters_G(steps):
    """fsdp=8: every weight split on ``embed`` is all-gathered when a pass uses it, P (n-1)/n
    bytes per pass, P the float32 bytes of the weights that pass gathers:

      teacher forward   every fsdp-split teacher weight but the position table;
      student forward   every fsdp-split student weight but the position table;
      student backward  the encoder layers' kernels once more (XLA frees the gathered weights after
                        the forward and gathers them again, as ZeRO-3 does; bias gradients need no
                        weight; the MLM head's weights, gathered once for the loss, stay).
    The word and position tables are looked up, not gathered: the [B, T] int32 ids (positions) are
    all-gathered and the looked-up rows resharded by an all-to-all of B T D / n floats, 5 lookups
    (teacher word + position, student word + position, and the student's position gradient, whose
    all-to-all also serves the word table's: the same cotangent). The masking gathers its [B, T]
    scores. The word table is gathered whole for the tied MLM head (so it is in P).

    Gradients: XLA:CPU all-reduces them (2 G (n-1)/n) and each device keeps its n-th (the
    reduce-scatter it has no op for): G = every student gradient but the position table's (that
    one is scatter-added locally after the all-to-all), plus float32 scalars (loss sums, the
    gradient norm's partial sums; < 0.1% here). The part every device only slices is exactly the
    fsdp-split gradients, which GPU and TPU reduce-scatter: (n-1)/n of it.
    """
    cost, state, teacher, _ = steps["fsdp=8"]
    n = 8
    position = lambda path, leaf: "position_embeddings" in path
    split = lambda path, leaf: _on_fsdp(path, leaf) and not position(path, leaf)
    p_teacher = _bytes(teacher, split)
    p_student = _bytes(state.params, split)
    p_backward = _bytes(state.params, lambda path, leaf: split(path, leaf) and "encoder" in path and "kernel" in path)
    gathered = _result_bytes(cost, ("fsdp",), "all-gather")
    assert gathered == p_teacher + p_student + p_backward + 6 * 4 * B * T
    assert _on_axis(cost, ("fsdp",), "all-gather") == pytest.approx(
        (n - 1) / n * (p_teacher + p_student + p_backward), rel=0.01)
    assert _result_bytes(cost, ("fsdp",), "all-to-all") == 5 * 4 * B * T * STUDENT.dim // n

    grads = _bytes(state.params, lambda path, leaf: not position(path, leaf))
    reduced = _result_bytes(cost, ("fsdp",), "all-reduce")
    assert grads <= reduced <= 1.001 * grads
    assert _on_axis(cost, ("fsdp",), "all-reduce") == pytest.approx(2 * (n - 1) / n * grads, rel=0.01)
    sliced = sum(c.sliced_bytes * c.executions for c in cost.collectives if c.kind == "all-reduce")
    assert sliced == p_student
    as_rs = sum(c.wire_bytes(reduce_scatter=True) for c in cost.collectives if c.kind == "all-reduce")
    assert as_rs == pytest.approx((n - 1) / n * p_student + 2 * (n - 1) / n * (reduced - p_student), rel=1e-9)


@pytest.mark.slow
def test_tensor_parallel_all_reduces_activations(steps):
    """tensor=8: Megatron-style, each matmul pair's output [B, T, D] (float32, A = 4 B T D bytes)
    is all-reduced over tensor. Forward, per layer: after out_lin and after lin2 (2); plus one for
    the vocabulary-split embedding lookup, per model. Backward, per student layer: the input
    gradients of q, k and v (XLA reduces the three separately, then adds them: 3 rather than one
    of their sum) and of lin1 (1): 4. The MLM head's input gradient [B T, D] adds one more. So
    (2 L_t + 1) + (2 L_s + 1) + 4 L_s + 1 all-reduces of A bytes.

    The rest on the tensor axis is the vocabulary-split softmax's row statistics ([B T] vectors),
    the argmax gathers of the accuracy, and scalars: under 3% of the activations at this width.
    """
    cost, _, _, text = steps["tensor=8"]
    n, activation = 8, 4 * B * T * STUDENT.dim
    count = (2 * TEACHER.num_hidden_layers + 1) + (2 * STUDENT.n_layers + 1) + 4 * STUDENT.n_layers + 1
    # The all-reduced arrays of activation shape (XLA combines some with scalars into one tuple op).
    module = hlo.parse_hlo_module(text)
    types = {i.name: i.type_text for instrs in module.computations.values() for i in instrs}
    activation_shapes = {f"f32[{B},{T},{STUDENT.dim}]", f"f32[{B * T},{STUDENT.dim}]"}
    reduced = 0
    for c in cost.collectives:
        if c.kind == "all-reduce":
            elements = [e.split("*/")[-1].split("{")[0] for e in hlo._top_level_elements(types[c.name])]
            reduced += c.executions * sum(e in activation_shapes for e in elements)
    assert reduced == count
    everything = sum(c.wire_bytes() for c in cost.collectives)
    assert {c.axes for c in cost.collectives} == {("tensor",)}
    rest = everything - 2 * (n - 1) / n * count * activation
    assert 0 <= rest <= 0.03 * everything


@pytest.mark.slow
def test_hlo_flops_are_the_model_flops():
    """One device: the program's dot FLOPs equal ``train_flops_per_token`` x tokens exactly (3x the
    student's forward, 1x the teacher's, every matmul including attention and the MLM heads on
    every row), when the loss's rows fit one chunk. With more rows than ``loss.chunk_rows`` the
    loss recomputes both heads' forward on every chunk in the backward pass (jax.checkpoint, to
    keep [rows, V] logits out of memory): exactly one more forward of both heads per token."""
    model = train_flops_per_token(STUDENT, TEACHER, T) * B * T
    cost, _, _, _ = _compile("data=1")
    assert cost.flops == pytest.approx(model, rel=0.02)
    assert cost.flops == model
    chunked, _, _, _ = _compile("data=1", LossConfig(chunk_rows=64))
    heads = sum(2 * (cfg.hidden ** 2 + cfg.hidden * cfg.vocab_size) for cfg in (STUDENT, TEACHER))
    assert chunked.flops == model + heads * B * T
    assert set(cost.flops_by_dtype()) == {"f32"}
    # Gradient accumulation: the same FLOPs over 2 micro-batches (a loop of trip count 2).
    accumulated, _, _, _ = _compile("data=1", accum=2)
    assert accumulated.flops == model


def test_op_costs_count_loops_and_in_place_updates():
    """The per-op bytes of a scan: the stacked weights are sliced (one layer read per iteration,
    not the whole stack) and the stacked outputs written in place (one row per iteration)."""
    w = jnp.ones((6, 32, 32), jnp.float32)
    x = jnp.ones((8, 32), jnp.float32)

    def f(w, x):
        def body(h, wl):
            h = jnp.tanh(h @ wl)
            return h, h
        return jax.lax.scan(body, x, w)

    text = jax.jit(f).lower(w, x).compile().as_text()
    ops = hlo.op_costs(text)
    flops = sum(o.flops * o.executions for o in ops)
    assert flops == 6 * 2 * 8 * 32 * 32
    traffic = sum(o.bytes * o.executions for o in ops)
    # At least: each layer's weights read once, each output row written once; far below reading the
    # whole [6, 32, 32] stack at every one of the 6 iterations.
    assert 6 * 32 * 32 * 4 <= traffic < 6 * (6 * 32 * 32 * 4)
    assert sum(o.transcendentals * o.executions for o in ops) == 6 * 8 * 32  # the tanh


def test_random_bits_loops_are_marked():
    """XLA:CPU draws random bits in rolled threefry loops; GPU and TPU unroll them into one fused
    pass. The ops inside such a loop are CPU-only; the loop itself appears once, for accelerators,
    as its state written once."""
    text = jax.jit(lambda key: jax.random.bernoulli(key, 0.9, (256, 64))).lower(
        jax.random.PRNGKey(0)).compile().as_text()
    ops = hlo.op_costs(text)
    inside = [o for o in ops if o.backend == "cpu"]
    loops = [o for o in ops if o.backend == "accelerator"]
    if not inside:  # an XLA that unrolls threefry on CPU too: nothing to undo
        assert not loops
        return
    assert loops and all(o.opcode == "rng-loop" and o.bytes >= 2 * 256 * 64 * 4 // 2 for o in loops)
    assert all(o.executions >= 1 for o in inside)
