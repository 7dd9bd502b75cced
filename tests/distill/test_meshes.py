"""Meshes and logical-axis rules: the sharded step equals the single-device step.

Flow under test: the same init, teacher and batches go through batch placement (data x fsdp) ->
masking -> teacher -> student -> losses -> accumulated grads -> AdamW update -> metrics, once on one
device and once per mesh (8 host CPU devices from conftest); losses and params must agree within
1e-5 after 3 updates, and with fsdp / tensor the params must really be split.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import tiny

from jaxdistil.distill.losses import LossConfig
from jaxdistil.distill.objective import StepConfig
from jaxdistil.models import BertConfig, DistilBertConfig
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig

# Every split dim divides by 8: vocab 128, hidden 64, heads 8, FFN 128.
V, D, HEADS, F, LAYERS, POS = 128, 64, 8, 128, 2, 32
SPECIAL, MASK_ID, STEPS = 5, 3, 3
# Dropout on: with partitionable threefry (JAX's default) the random bits do not depend on sharding.
S_CFG = DistilBertConfig(vocab_size=V, dim=D, n_heads=HEADS, hidden_dim=F, n_layers=LAYERS,
                         max_position_embeddings=POS, dropout=0.1, attention_dropout=0.1)
T_CFG = BertConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                   num_hidden_layers=LAYERS, max_position_embeddings=POS)
# Two micro-batches per update: the strided split and the accumulator constraints run sharded too.
CFG = StepConfig(loss=LossConfig(chunk_rows=64),
                     optim=OptimConfig(learning_rate=1e-3, warmup_prop=0.0, total_steps=10,
                                       grad_accum_steps=2, weight_decay=0.01),
                     mask_id=MASK_ID)


def batches() -> list[dict[str, np.ndarray]]:
    rs = np.random.RandomState(0)
    out = []
    for _ in range(STEPS):
        ids = rs.randint(SPECIAL, V, size=(16, 16)).astype(np.int32)
        lens = rs.randint(8, 17, size=16)
        mask = (np.arange(16)[None] < lens[:, None]).astype(np.int32)
        out.append({"input_ids": np.where(mask > 0, ids, 0).astype(np.int32), "attention_mask": mask})
    return out


def run(mesh: shd.MeshConfig, init_params_host=None, devices=None):
    """3 updates on ``mesh``; returns (initial params, final params, per-step metrics, state, teacher)."""
    # Unoptimised LLVM code: compiles twice as fast; three tiny steps do not care about speed.
    t = tiny.build(CFG, S_CFG, T_CFG, mesh, devices, student_params=init_params_host,
                   compiler_options={"xla_backend_optimization_level": 0})
    init_host = jax.device_get(t.state.params)
    metrics = [jax.device_get(t.step(batch)) for batch in batches()]
    return init_host, jax.device_get(t.state.params), metrics, t.state, t.teacher_params


@pytest.fixture(scope="module")
def reference():
    """The single-device run (born on one device)."""
    return run(shd.MeshConfig(data=1), devices=jax.devices()[:1])


def split_dims(array) -> tuple[int, ...]:
    """Dims where this device's shard is smaller than the global array."""
    shard = array.addressable_shards[0].data.shape
    return tuple(i for i, (a, b) in enumerate(zip(shard, array.shape)) if a < b)


MESHES = {
    "data8": shd.MeshConfig(data=8),
    "fsdp8": shd.MeshConfig(data=1, fsdp=8),
    "data2_tensor4": shd.MeshConfig(data=2, tensor=4),
    "fsdp2_tensor4": shd.MeshConfig(data=1, fsdp=2, tensor=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(reference, name):
    ref_init, ref_params, ref_metrics, _, _ = reference
    # fsdp2_tensor4: params born sharded from the same key (must equal the single-device init);
    # the other meshes start from the host copy of that init.
    born = name == "fsdp2_tensor4"
    init, params, metrics, state, t_params = run(MESHES[name], None if born else ref_init)
    assert state.step.sharding.mesh.devices.size == 8
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), init, ref_init)

    for i, (m, r) in enumerate(zip(metrics, ref_metrics)):
        jax.tree_util.tree_map_with_path(
            lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5,
                                                          err_msg=f"step {i} {jax.tree_util.keystr(path)}"), m, r)
    assert ref_metrics[-1]["loss"] < ref_metrics[0]["loss"]
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(a, b, atol=1e-5, err_msg=jax.tree_util.keystr(path)),
        params, ref_params)

    # The layout is what the rules say, and the arrays really are split (shard shapes).
    sizes = MESHES[name].sizes()
    lin1 = state.params["encoder"]["layers"]["lin1"]["kernel"]  # [L, embed, mlp]
    q = state.params["encoder"]["layers"]["q_lin"]["kernel"]  # [L, embed, heads, kv]
    emb = state.params["embeddings"]["word_embeddings"]["embedding"]  # [vocab, embed]
    # AdamW first moment of lin1.
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["model"]["encoder"]["layers"]["lin1"]["kernel"]
    t_lin1 = t_params["encoder"]["layers"]["lin1"]["kernel"]
    expect_lin1 = tuple(d for d, on in ((1, sizes["fsdp"] > 1), (2, sizes["tensor"] > 1)) if on)
    assert split_dims(lin1) == expect_lin1
    assert split_dims(mu) == expect_lin1
    assert split_dims(t_lin1) == expect_lin1
    assert split_dims(q) == tuple(d for d, on in ((1, sizes["fsdp"] > 1), (2, sizes["tensor"] > 1)) if on)
    assert split_dims(emb) == tuple(d for d, on in ((0, sizes["tensor"] > 1), (1, sizes["fsdp"] > 1)) if on)
    if name == "data8":
        assert lin1.addressable_shards[0].data.shape == lin1.shape  # pure data parallel: replicated
    else:
        n_split = sizes["fsdp"] * sizes["tensor"]
        assert lin1.addressable_shards[0].data.size * n_split == lin1.size
