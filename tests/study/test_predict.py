"""The time model (jaxdistil.study.predict, roofline-v1): its formulas against hand-computed figures
on synthetic step costs, the study's prediction outputs through the CLI, and the model calibrated on
this CPU against single-device steps measured here."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest

from jaxdistil import cli
from jaxdistil.distill.builder import DistillStep, StepSpec
from jaxdistil.distill.objective import StepConfig
from jaxdistil.models import BertConfig, DistilBertConfig, save_config
from jaxdistil.study import cost as costlib
from jaxdistil.study import hardware as hw
from jaxdistil.study import memory
from jaxdistil.study import predict as pr
from jaxdistil.study import study as st
from jaxdistil.study.hlo import OpCost
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig

MESH8 = {"data": 8, "fsdp": 1, "tensor": 1}


def _cost(collectives=(), memory_=None, mesh=MESH8):
    ops = [OpCost("dot.1", "dot", flops=1e12, bytes=10**9, executions=2, dtype="bf16"),
           OpCost("fusion.1", "fusion", flops=0.0, bytes=335 * 10**7, executions=1, dtype="")]
    memory_ = memory_ or {"argument": 30 * 10**9, "temp": 20 * 10**9, "output": 10**9, "alias": 10**9}
    return costlib.StepCost(dict(mesh), ops, list(collectives), memory_)


def _all_reduce(nbytes, axes=("data",), groups=None, sliced=0):
    groups = groups or [list(range(8))]
    return costlib.Collective("all-reduce", "ar", nbytes, 1, len(groups[0]), axes, groups, sliced)


def test_roofline_per_op_and_overlap_bounds():
    target = hw.parse_target("H100")
    cost = _cost([_all_reduce(45 * 10**7)])
    p = pr.predict(cost, target, tokens_per_step=1_000_000, model_flops_per_step=8e12, compute_dtype="bfloat16")
    assert p.model == "roofline-v1" and p.refused is None and p.layout == "8 GPUs in 1 node of 8"
    # dot: max(1e12 / 989.5e12, 1e9 / 3.35e12) = 1.0106 ms, twice; the fusion 3.35e9 / 3.35e12 = 1 ms.
    assert p.matmul_s == pytest.approx(2 * 1e12 / 989.5e12)
    assert p.memory_s == pytest.approx(1e-3) and p.alloc_s == 0
    # ring all-reduce over NVLink: 2 (n-1)/n R / 450 GB/s + 2 (n-1) hops x 1 us
    ring = 2 * 7 / 8 * 4.5e8 / 450e9 + 14 * 1e-6
    assert p.collective_s == pytest.approx(ring) and p.collective_by_axes == {"data": pytest.approx(ring)}
    compute = 2 * 1e12 / 989.5e12 + 1e-3
    assert p.step_s_overlap == pytest.approx(max(compute, ring))
    assert p.step_s_serial == pytest.approx(compute + ring)
    assert p.tokens_per_s_overlap == pytest.approx(1e6 / max(compute, ring))
    assert p.mfu_serial == pytest.approx(8e12 / (compute + ring) / (8 * 989.5e12))
    assert p.bound == "compute"
    # 30 + 20 GB of arguments and temporaries (the outputs alias the donated state): fits 80 GB.
    assert p.needed_bytes == 50 * 10**9 and p.fits is True and p.capacity_bytes == 80e9


def test_bounds_fit_and_refusals():
    heavy = _cost([_all_reduce(10**10)])
    p = pr.predict(heavy, hw.parse_target("H100"), 1, 1.0, "bfloat16")
    assert p.bound == "collectives (data)" and p.step_s_overlap == p.collective_s
    memory_bound = costlib.StepCost(MESH8, [OpCost("f", "fusion", 0.0, 10**10, 1, "")], [],
                                    {"argument": 1, "temp": 1, "output": 0, "alias": 0})
    assert pr.predict(memory_bound, hw.parse_target("H100"), 1, 1.0).bound == "HBM"

    big = _cost(memory_={"argument": 70 * 10**9, "temp": 40 * 10**9, "output": 2 * 10**9, "alias": 10**9})
    p = pr.predict(big, hw.parse_target("H100"), 1, 1.0)
    assert p.needed_bytes == 111 * 10**9 and p.fits is False
    assert any(n.startswith("does not fit: needs 103.4 GiB per device, H100 SXM has 74.5 GiB") for n in p.notes)
    p = pr.predict(big, hw.parse_target("H200"), 1, 1.0)  # 111 of 141 GB: more than JAX's default 75%
    assert p.fits is True and any("XLA_PYTHON_CLIENT_MEM_FRACTION" in n for n in p.notes)

    refused = pr.predict(big, hw.parse_target("v5p-64"), 1, 1.0)
    assert "has 32 devices but the mesh has 8" in refused.refused and refused.step_s_overlap is None


def test_links_of_the_target():
    # The same all-reduce over 8 devices: NVLink on one H100 node, 3 ICI links on a 2x2x2 v5p-16,
    # InfiniBand when the group spans two H100 nodes (mesh data=2 x fsdp=8 on 16 GPUs).
    cost = _cost([_all_reduce(10**9)])
    nvlink = pr.predict(cost, hw.parse_target("H100x8"), 1, 1.0).collective_s
    assert nvlink == pytest.approx(1.75e9 / 450e9 + 14e-6)
    v5p = pr.predict(cost, hw.parse_target("v5p-16"), 1, 1.0)
    assert v5p.collective_s == pytest.approx(1.75e9 / 300e9 + 14e-6) and v5p.links == {"data": "ICI x3"}
    mesh16 = {"data": 2, "fsdp": 8, "tensor": 1}
    across = costlib.Collective("all-reduce", "ar", 10**9, 1, 2, ("data",), [[i, i + 8] for i in range(8)])
    p = pr.predict(_cost([across], mesh=mesh16), hw.parse_target("H100x16"), 1, 1.0)
    assert p.links == {"data": "InfiniBand"} and p.collective_s == pytest.approx(1e9 / 50e9 + 2 * 5e-6)


def test_reduce_scatter_on_accelerators_only():
    # An all-reduce of 8e8 bytes of which 6.4e8 are only sliced afterwards (XLA:CPU's reduce-scatter).
    ar = _all_reduce(8 * 10**8, axes=("fsdp",), sliced=64 * 10**7)
    cost = _cost([ar], mesh={"data": 1, "fsdp": 8, "tensor": 1})
    gpu = pr.predict(cost, hw.parse_target("H100"), 1, 1.0)
    wire = 1.75 * 1.6e8 + 7 * 0.8e8  # the rest all-reduced, the sliced part reduce-scattered
    assert gpu.collective_s == pytest.approx(wire / 450e9 + 14e-6)
    assert any("timed as reduce-scatters" in n for n in gpu.notes)
    rates = hw.CpuRates(matmul_f32=1e11, matmul_bf16=1e10, memory=2e10, alloc=1e9)
    cpu = pr.predict(cost, hw.Target(hw.cpu_chip(rates), None, "cpu"), 1, 1.0)
    # CPU: as the program holds it, every host device sharing the machine's memory bandwidth.
    assert cpu.collective_s == pytest.approx(1.75 * 8e8 / (2e10 / 8))
    # ... and its compute: the 8 devices share the cores (1/8 of each rate each).
    assert cpu.matmul_s == pytest.approx(2 * 1e12 * 8 / 1e10)
    assert cpu.alloc_s == pytest.approx(20e9 * 8 / 1e9)


def test_formatting():
    assert pr.fmt_range(0.0123, 0.0456, 1e3) == "12.3–45.6"
    assert pr.fmt_range(1.0, 1.0) == "1" and pr.fmt_range(None, 1.0) == "n/a"


# --------------------------------------------------------------------------------------------------
# The study's outputs with --predict (CLI, compiled only)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_study_predict_outputs(tmp_path, capsys):
    teacher = tmp_path / "teacher"
    save_config(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=8,
                           intermediate_size=64, max_position_embeddings=32), teacher)
    out = tmp_path / "study"
    code = cli.main(["shard-study", "data=8", "fsdp=8", f"teacher.model={teacher}", "student.layers=0",
                     "--batch", "8", "--seq", "16", "--steps", "0", "--output", str(out), "--predict",
                     "H100,v5p-16,v5p-64", "--compiler-option", "xla_backend_optimization_level=0"])
    printed = capsys.readouterr().out
    assert code == 0 and "compiled and analysed only" in printed and "predicted" in printed
    doc = json.loads((out / "shard_study.json").read_text())
    assert doc["meta"]["prediction_model"].startswith("roofline-v1")
    assert doc["meta"]["hardware"]["v5p-16"]["name"] == "TPU v5p"
    fsdp = doc["strategies"][1]
    assert fsdp["losses"] == [] and fsdp["cost"]["flops_per_device"] > 0
    assert set(fsdp["cost"]["collective_wire_bytes"]) == {"fsdp"}
    by_target = {p["target"]: p for p in fsdp["predictions"]}
    assert by_target["H100"]["model"] == "roofline-v1" and by_target["H100"]["fits"] is True
    assert by_target["v5p-16"]["layout"] == "8 chips as 2x2x2 (no wraparound)"
    assert "mesh has 8" in by_target["v5p-64"]["refused"]
    with open(out / "shard_study.csv") as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["predict_H100_step_s_overlap"]) > 0 and rows[0]["predict_v5p-16_model"] == "roofline-v1"
    markdown = (out / "shard_study.md").read_text()
    assert "| mesh | target | devices as |" in markdown and "fsdp=8 on v5p-64: v5p-64 has 32 devices" in markdown
    assert (out / "shard_study.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------------------------------
# Calibrated on this CPU: predicted single-device step times against measured ones
# --------------------------------------------------------------------------------------------------

# (vocab, width, teacher layers, student layers, FFN, batch, length): the batch x length, the teacher
# and student depths and the width vary; each step takes a few hundred ms here.
CPU_SHAPES = [
    (4096, 256, 4, 2, 1024, 8, 128),
    (2048, 384, 2, 2, 1536, 4, 256),
    (4096, 128, 4, 4, 512, 8, 128),
    (1024, 512, 3, 3, 2048, 8, 64),
    (8192, 256, 2, 1, 1024, 16, 64),
]
ROUNDS = 3  # the median of three rounds per shape


def _cpu_step(vocab, width, teacher_layers, student_layers, ffn, batch, length):
    teacher = BertConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=teacher_layers, num_attention_heads=4,
                         intermediate_size=ffn, max_position_embeddings=length)
    student = DistilBertConfig(vocab_size=vocab, dim=width, n_heads=4, hidden_dim=ffn, n_layers=student_layers,
                               max_position_embeddings=length)
    spec = StepSpec(student, teacher, StepConfig(optim=OptimConfig(total_steps=100), mask_id=3), shd.MeshConfig(data=1))
    built = DistillStep(spec, jax.devices()[:1])
    state = built.init_state(jax.random.PRNGKey(0))
    consts = built.consts(built.random_teacher(jax.random.PRNGKey(1)), st.token_weights(vocab))
    setup = st.StudySetup(spec=spec, batch=batch, seq=length)
    batches = [built.shard_batch(b) for b in st.synthetic_batches(setup, 2)]
    compiled = built.train_step.lower(state, batches[0], consts).compile()
    cost = costlib.step_cost(compiled.as_text(), built.mesh.shape, memory.memory_analysis(compiled))
    return compiled, state, batches, consts, cost


@pytest.mark.slow
def test_cpu_prediction_within_25_percent(record_property):
    """For each shape: compile the single-device step, then alternate ROUNDS times a calibration of
    this CPU (``hardware.measure_cpu``: matmul rate, in-place memory rate, first-touch rate, each a
    mean over a window as long as a step) and one timed step, so that both see the same competition
    for the cores (the machine is shared); the medians of each go into the comparison. Predicted =
    roofline-v1 on the calibrated ``cpu`` target (one device: no collectives, compute only)."""
    results = []
    for shape in CPU_SHAPES:
        compiled, state, batches, consts, cost = _cpu_step(*shape)
        state, metrics = compiled(state, batches[0], consts)  # warm up
        jax.block_until_ready(metrics)
        rates, steps = [], []
        for i in range(ROUNDS):
            rates.append(hw.measure_cpu(jax.devices()[0]))
            start = time.perf_counter()
            state, metrics = compiled(state, batches[i % 2], consts)
            jax.block_until_ready((state, metrics))
            steps.append(time.perf_counter() - start)
        best = hw.CpuRates(*(float(np.median([getattr(r, f) for r in rates]))
                             for f in ("matmul_f32", "matmul_bf16", "memory", "alloc")))
        p = pr.predict(cost, hw.Target(hw.cpu_chip(best), None, "cpu"), 1, 1.0)
        measured = float(np.median(steps))
        results.append({"shape": shape, "measured_s": measured, "predicted_s": p.step_s_serial,
                        "ratio": p.step_s_serial / measured, "load_1min": os.getloadavg()[0],
                        "matmul_gflops": best.matmul_f32 / 1e9, "memory_gbs": best.memory / 1e9,
                        "alloc_gbs": best.alloc / 1e9})
    record_property("cpu_prediction", json.dumps(results))
    for r in results:
        print(r)
    within = [r for r in results if abs(r["ratio"] - 1) <= 0.25]
    assert len(within) >= 4, results
    assert np.isfinite([r["ratio"] for r in results]).all()


def test_fused_bound_and_random_bits_loops():
    # A dot, an elementwise op, a rolled random-bits loop's body op (XLA:CPU only) and that loop as
    # one pass (GPU/TPU): each target counts its own.
    ops = [OpCost("dot", "dot", 2e12, 10**9, 1, "bf16"), OpCost("add", "fusion", 0.0, 67 * 10**8, 1, ""),
           OpCost("body", "fusion", 0.0, 335 * 10**7, 10, "", backend="cpu"),
           OpCost("loop", "rng-loop", 0.0, 335 * 10**6, 1, "", backend="accelerator")]
    memory_ = {"argument": 335 * 10**6, "temp": 10**9, "output": 335 * 10**6, "alias": 335 * 10**6}
    cost = costlib.StepCost(MESH8, ops, [], memory_)
    p = pr.predict(cost, hw.parse_target("H100"), 1, 8 * 989.5e12 * 1e-3, "bfloat16")
    dot = 2e12 / 989.5e12
    assert p.matmul_s == pytest.approx(dot) and p.memory_s == pytest.approx(2e-3 + 1e-4)
    assert p.compute_fused_s == pytest.approx(dot + 2e-4)  # the dot, arguments and outputs once
    assert p.step_s_fused == pytest.approx(dot + 2e-4) and p.mfu_fused == pytest.approx(1e-3 / (dot + 2e-4))
    assert any("rolled random-bits loop" in n for n in p.notes)
    rates = hw.CpuRates(matmul_f32=1e12, matmul_bf16=2e12, memory=3.35e10, alloc=1e12)
    cpu = pr.predict(dataclasses.replace(cost, mesh_sizes={"data": 1, "fsdp": 1, "tensor": 1}),
                     hw.Target(hw.cpu_chip(rates), None, "cpu"), 1, 1.0)
    assert cpu.memory_s == pytest.approx(0.2 + 10 * 0.1) and not cpu.notes
