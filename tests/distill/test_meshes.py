"""Meshes and logical-axis rules: the sharded step equals the single-device step.

Flow under test: the same init, teacher and batches go through batch placement (data x fsdp) ->
masking -> teacher -> student -> losses -> accumulated grads -> AdamW update -> metrics, once on one
device and once per mesh (8 host CPU devices from conftest); losses and params must agree within
1e-5 after 3 updates, and with fsdp / tensor the params must really be split.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxdistil.training import sharding as shd
from jaxdistil.distill import step as stp
from jaxdistil.distill.losses import LossConfig
from jaxdistil.training.optim import OptimConfig, make_optimizer
from jaxdistil.errors import UserError
from jaxdistil.models import BertConfig, DistilBertConfig, build_model, init_params

# Every split dim divides by 8: vocab 128, hidden 64, heads 8, FFN 128.
V, D, HEADS, F, LAYERS, POS = 128, 64, 8, 128, 2, 32
SPECIAL, MASK_ID, STEPS = 5, 3, 3
# Dropout on: with partitionable threefry (JAX's default) the random bits do not depend on sharding.
S_CFG = DistilBertConfig(vocab_size=V, dim=D, n_heads=HEADS, hidden_dim=F, n_layers=LAYERS,
                         max_position_embeddings=POS, dropout=0.1, attention_dropout=0.1)
T_CFG = BertConfig(vocab_size=V, hidden_size=D, num_attention_heads=HEADS, intermediate_size=F,
                   num_hidden_layers=LAYERS, max_position_embeddings=POS)
# Two micro-batches per update: the strided split and the accumulator constraints run sharded too.
CFG = stp.StepConfig(loss=LossConfig(chunk_rows=64),
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


def token_weights(mesh):
    w = np.ones((V,), np.float32)
    w[:SPECIAL] = 0.0
    return jax.device_put(w, shd.replicated(mesh))


@functools.lru_cache(maxsize=None)
def teacher_host_params():
    model = build_model(T_CFG)
    return jax.device_get(jax.jit(lambda r: init_params(model, r))(jax.random.PRNGKey(1)))


def run(mesh, init_params_host=None):
    """3 updates on ``mesh``; returns (initial params, final params, per-step metrics, state, teacher)."""
    student, teacher = stp.build_models(CFG, S_CFG, T_CFG)
    tx, schedule = make_optimizer(CFG.optim, model_cfg=S_CFG)
    state, state_sh = stp.init_train_state(student, jax.random.PRNGKey(0), tx, mesh, params=init_params_host)
    init_host = jax.device_get(state.params)
    t_params, t_sh = stp.shard_teacher(teacher, teacher_host_params(), mesh)
    # Unoptimised LLVM code: compiles twice as fast; three tiny steps do not care about speed.
    step = stp.make_train_step(student, teacher, CFG, tx, schedule, mesh, shd.RULES, state_sh, t_sh,
                               compiler_options={"xla_backend_optimization_level": 0})
    metrics = []
    for batch in batches():
        state, m = step(state, t_params, shd.shard_batch(batch, mesh), token_weights(mesh))
        metrics.append(jax.device_get(m))
    return init_host, jax.device_get(state.params), metrics, state, t_params


@pytest.fixture(scope="module")
def reference():
    """The single-device run (born on one device)."""
    return run(shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1]))


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


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_step_equals_single_device(reference, name):
    ref_init, ref_params, ref_metrics, _, _ = reference
    mesh = shd.make_mesh(MESHES[name])
    assert mesh.devices.size == 8
    # fsdp2_tensor4: params born sharded from the same key (must equal the single-device init);
    # the other meshes start from the host copy of that init.
    born = name == "fsdp2_tensor4"
    init, params, metrics, state, t_params = run(mesh, None if born else ref_init)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), init, ref_init)

    for i, (m, r) in enumerate(zip(metrics, ref_metrics)):
        for key in r:
            np.testing.assert_allclose(m[key], r[key], atol=1e-5, rtol=1e-5, err_msg=f"step {i} {key}")
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
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")["encoder"]["layers"]["lin1"]["kernel"]
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


# ------------------------------------------------------------------------------------------------
# Mesh, rules, divisibility (no compiles)
# ------------------------------------------------------------------------------------------------


def test_make_mesh_sizes_and_errors():
    mesh = shd.make_mesh(shd.MeshConfig(data=-1, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert shd.make_mesh(shd.MeshConfig(data=-1)).shape["data"] == 8
    with pytest.raises(UserError, match="tensor=3"):
        shd.make_mesh(shd.MeshConfig(data=-1, tensor=3))
    with pytest.raises(UserError, match="= 16 devices but 8 are available"):
        shd.make_mesh(shd.MeshConfig(data=4, fsdp=4))
    with pytest.raises(UserError, match="only one mesh axis"):
        shd.MeshConfig(data=-1, fsdp=-1)
    with pytest.raises(UserError, match="mesh.fsdp"):
        shd.MeshConfig(fsdp=0)


def test_rule_overrides():
    rules = dict(shd.make_rules(["rules.mlp=none", "embed=fsdp,tensor"]))
    assert rules["mlp"] is None and rules["embed"] == ("fsdp", "tensor")
    assert dict(shd.make_rules({"vocab": "fsdp"}))["vocab"] == "fsdp"
    assert shd.make_rules(None) == shd.RULES
    # The override keeps its place in the priority order.
    assert [n for n, _ in shd.make_rules({"mlp": "fsdp"})] == [n for n, _ in shd.RULES]
    with pytest.raises(UserError, match="unknown logical axis 'mpl'"):
        shd.make_rules(["mpl=tensor"])
    with pytest.raises(UserError, match="unknown mesh axis 'model'"):
        shd.make_rules({"mlp": "model"})
    with pytest.raises(UserError, match="name=mesh_axes"):
        shd.make_rules(["mlp"])


def test_param_specs_follow_rules():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    specs = jax.tree_util.tree_map(lambda s: s.spec, shd.param_shardings(build_model(S_CFG), mesh))
    layers = specs["encoder"]["layers"]
    assert layers["q_lin"]["kernel"] == P(None, "fsdp", "tensor", None)
    assert layers["out_lin"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert layers["lin2"]["kernel"] == P(None, "tensor", "fsdp")
    assert layers["sa_layer_norm"]["scale"] == P(None, None)
    assert specs["embeddings"]["word_embeddings"]["embedding"] == P("tensor", "fsdp")
    assert specs["mlm_head"]["bias"] == P("tensor")
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_indivisible_dims_replicate_or_raise():
    odd = DistilBertConfig(vocab_size=30, dim=D, n_heads=HEADS, hidden_dim=F, n_layers=1,
                           max_position_embeddings=8)
    mesh = shd.make_mesh(shd.MeshConfig(data=2, tensor=4))
    with pytest.warns(UserWarning, match=r"word_embeddings/embedding: dim 0 \(vocab\) of size 30 .*tensor=4"):
        sh = shd.param_shardings(build_model(odd), mesh)
    assert sh["embeddings"]["word_embeddings"]["embedding"].spec == P(None, "fsdp")  # fsdp has size 1 here
    assert sh["encoder"]["layers"]["lin1"]["kernel"].spec == P(None, "fsdp", "tensor")
    with pytest.raises(UserError, match=r"^embeddings/word_embeddings/embedding: dim 0 \(vocab\) of size 30 "
                                        r"does not divide by mesh tensor=4; change .* the rule for 'vocab'"):
        shd.param_shardings(build_model(odd), mesh, strict=True)
    # The fix the message suggests: a rule override that leaves the vocabulary whole.
    sh = shd.param_shardings(build_model(odd), mesh, shd.make_rules({"vocab": None}), strict=True)
    assert sh["mlm_head"]["bias"].spec == P(None)


def test_batch_placement():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=2, tensor=2))
    batch = shd.shard_batch({"input_ids": np.arange(8 * 4, dtype=np.int32).reshape(8, 4)}, mesh)
    arr = batch["input_ids"]
    assert arr.sharding.spec == P(("data", "fsdp"))
    assert arr.addressable_shards[0].data.shape == (2, 4)
    np.testing.assert_array_equal(np.asarray(arr), np.arange(32).reshape(8, 4))
    with pytest.raises(UserError, match="batch size 6"):
        shd.shard_batch({"input_ids": np.zeros((6, 4), np.int32)}, mesh)
