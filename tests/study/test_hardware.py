"""The hardware table (jaxdistil.study.hardware): target names, slice shapes, where a mesh's devices
sit and which links a group of them uses, and the CPU's calibration. Expected values are written
out by hand from the vendors' pages (cited in the module) and the topologies, not recomputed."""

from __future__ import annotations

import itertools
import math

import pytest

from jaxdistil import cli
from jaxdistil.errors import UserError
from jaxdistil.study import hardware as hw


@pytest.mark.parametrize("name, chip, devices, label", [
    ("H100", "H100 SXM", None, "H100"),
    ("h100x16", "H100 SXM", 16, "H100x16"),
    ("H100-SXM", "H100 SXM", None, "H100"),
    ("H200x8", "H200 SXM", 8, "H200x8"),
    ("a100-80gb", "A100 80GB SXM", None, "A100"),
    ("v5p-16", "TPU v5p", 8, "v5p-16"),  # 16 TensorCores = 8 chips
    ("v5p-64", "TPU v5p", 32, "v5p-64"),
    ("v4-8", "TPU v4", 4, "v4-8"),
    ("v5e-16", "TPU v5e", 16, "v5e-16"),  # v5e and v6e count chips
    ("v5litepod-16", "TPU v5e", 16, "v5e-16"),
    ("v6e-8", "TPU v6e", 8, "v6e-8"),
    ("V5P", "TPU v5p", None, "v5p"),
])
def test_target_names(name, chip, devices, label):
    target = hw.parse_target(name)
    assert (target.chip.name, target.devices, target.label) == (chip, devices, label)


@pytest.mark.parametrize("text, words", [
    ("H300", ["'H300'", "unknown accelerator", "H100"]),
    ("v5p-15", ["multiple of 2", "v5p-16"]),  # TensorCores come in pairs
    ("v5p-24", ["12 chips", "power-of-two"]),
    ("v5e-512", ["at most 256"]),
    ("v7-8", ["unknown TPU generation", "v5p"]),
    ("H100x0", [">= 1"]),
    ("H100,,v5p", ["empty name"]),
    ("H100,h100", ["twice"]),
])
def test_bad_names_are_one_line_errors(text, words):
    with pytest.raises(UserError) as err:
        hw.parse_targets(text)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_predict_exits_2_before_anything_compiles(tmp_path, capsys):
    code = cli.main(["shard-study", "data=8", "--predict", "H100,B300", "--batch", "8", "--seq", "16",
                     "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: --predict 'B300': unknown accelerator")
    assert not (tmp_path / "out").exists()


def test_table_figures():
    # Published peaks (dense) and capacities, copied from the pages cited in hardware.py.
    h100, v5p, v5e = hw.CHIPS["h100"], hw.CHIPS["v5p"], hw.CHIPS["v5e"]
    assert h100.peak("bf16") == 989.5e12 and h100.peak("f32") == 494.5e12 and h100.hbm_bytes_per_s == 3.35e12
    assert h100.link_bytes_per_s == 450e9 and h100.network_bytes_per_s == 50e9  # 900 GB/s both ways; 400 Gb/s
    assert hw.CHIPS["h200"].hbm_bytes == 141e9 and hw.CHIPS["a100"].peak("bf16") == 312e12
    assert v5p.peak("bf16") == 459e12 and v5p.hbm_bytes == 95 * 2**30
    assert v5p.link_bytes_per_s * v5p.ports * 2 == pytest.approx(1200e9)  # bidirectional ICI per chip
    assert v5e.link_bytes_per_s * v5e.ports * 2 == pytest.approx(400e9)
    assert hw.CHIPS["v6e"].link_bytes_per_s * 4 * 2 == pytest.approx(800e9)
    assert hw.CHIPS["v4"].link_bytes_per_s * 6 * 4096 == pytest.approx(1.1e15)  # the pod's all-reduce bandwidth
    for chip in hw.CHIPS.values():
        assert chip.source and chip.hbm_bytes > 0 and chip.hbm_bytes_per_s > 0 and chip.link_bytes_per_s > 0
        assert chip.peak("bf16") >= chip.peak("f32") > 0


def test_slice_shapes_are_the_documented_ones():
    # cloud.google.com/tpu/docs/v5p and /v6e list these shapes (order aside).
    assert [hw.torus_shape(n, 3) for n in (4, 8, 32, 64, 128)] == [
        (1, 2, 2), (2, 2, 2), (2, 4, 4), (4, 4, 4), (4, 4, 8)]
    assert [hw.torus_shape(n, 2) for n in (4, 8, 16, 32, 64, 256)] == [
        (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (16, 16)]


def _sizes(data=1, fsdp=1, tensor=1):
    return {"data": data, "fsdp": fsdp, "tensor": tensor}


def _groups(sizes, axis):
    """Groups of flat mesh positions along one axis (row-major positions), by hand."""
    names = list(sizes)
    shape = [sizes[a] for a in names]
    k = names.index(axis)
    out = {}
    for coords in itertools.product(*(range(s) for s in shape)):
        flat = 0
        for c, s in zip(coords, shape):
            flat = flat * s + c
        key = coords[:k] + coords[k + 1:]
        out.setdefault(key, []).append(flat)
    return list(out.values())


def test_tpu_axes_on_the_torus():
    # v5p-16: 8 chips as 2x2x2, no wraparound: each axis of a 2x2x2 mesh is one link; data=8 spans
    # all three dims.
    layout = hw.parse_target("v5p-16").slice_for(_sizes(2, 2, 2))
    coords = {layout._coords(i) for i in range(8)}
    assert len(coords) == 8  # every device on its own chip
    link = hw.CHIPS["v5p"].link_bytes_per_s
    for axis in ("data", "fsdp", "tensor"):
        assert {layout.bandwidth(g)[0] for g in _groups(_sizes(2, 2, 2), axis)} == {link}
    assert hw.parse_target("v5p-16").slice_for(_sizes(8)).bandwidth(range(8))[0] == 3 * link
    # v5p-128: 64 chips, a full 4x4x4 cube with wraparound: a ring over a whole dim of 4 runs both ways.
    cube = hw.parse_target("v5p-128").slice_for(_sizes(16, 1, 4))
    assert cube.describe() == "64 chips as 4x4x4 (torus)"
    assert {cube.bandwidth(g)[0] for g in _groups(_sizes(16, 1, 4), "tensor")} == {2 * link}
    assert {cube.bandwidth(g)[0] for g in _groups(_sizes(16, 1, 4), "data")} == {4 * link}
    # v5e-16: 4x4 without wraparound: fsdp=16 spans both dims, one link each.
    v5e = hw.parse_target("v5e-16").slice_for(_sizes(1, 16))
    assert v5e.bandwidth(range(16))[0] == 2 * hw.CHIPS["v5e"].link_bytes_per_s


def test_gpu_groups_inside_and_across_nodes():
    layout = hw.parse_target("H100x16").slice_for(_sizes(2, 8))
    assert layout.describe() == "16 GPUs in 2 nodes of 8"
    fsdp_groups, data_groups = _groups(_sizes(2, 8), "fsdp"), _groups(_sizes(2, 8), "data")
    assert {layout.bandwidth(g)[2] for g in fsdp_groups} == {"NVLink"}
    assert {layout.bandwidth(g)[:2] for g in data_groups} == {(50e9, hw.CHIPS["h100"].network_hop_latency_s)}
    assert layout.bandwidth([3])[0] == math.inf  # a group of one moves nothing


def test_device_count_must_match():
    assert hw.parse_target("H100").check_devices(8) is None
    assert hw.parse_target("v5p-16").check_devices(8) is None
    refusal = hw.parse_target("v5p-64").check_devices(8)
    assert "32 devices but the mesh has 8" in refusal and "--host-devices 32" in refusal


def test_cpu_calibration_measures_this_machine():
    import jax

    small = {"n": 256, "elements": 1 << 20, "seconds": 0.02}
    rates = hw.measure_cpu(jax.devices()[0], **small)
    assert rates.matmul_f32 > 1e8 and rates.matmul_bf16 > 1e6 and rates.memory > 1e8 and rates.alloc > 1e7
    chip = hw.cpu_chip(rates)
    assert chip.peak("f32") == rates.matmul_f32 and chip.alloc_bytes_per_s == rates.alloc
    targets, measured = hw.calibrate_cpu(hw.parse_targets("H100,cpu"), jax.devices()[0], **small)
    assert measured is not None and targets[0].chip is hw.CHIPS["h100"] and targets[1].chip.family == "cpu"
    assert targets[1].chip.name == "cpu (calibrated)"
