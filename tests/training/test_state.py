"""The train state: born sharded by the rules (params, extra modules, optimizer moments), the extra
modules drawn from their own keys, given params placed, the abstract state equal to the real one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import student_cfg

from jaxdistil.distill.objective import projection_params
from jaxdistil.models import build_model
from jaxdistil.training import sharding as shd
from jaxdistil.training.optim import OptimConfig, make_optimizer
from jaxdistil.training.state import abstract_train_state, init_train_state, param_count, trainable

CFG = student_cfg()
EXTRA = {"proj": lambda key: projection_params(key, (64, 32), 0.02)}


@pytest.mark.slow
def test_born_sharded_state_matches_its_abstract_twin():
    mesh = shd.make_mesh(shd.MeshConfig(data=2, fsdp=4))
    model = build_model(CFG)
    tx, _ = make_optimizer(OptimConfig(total_steps=10))
    abstract, shardings = abstract_train_state(model, tx, mesh, extra_init=EXTRA)
    state, got_shardings = init_train_state(model, jax.random.PRNGKey(0), tx, mesh, extra_init=EXTRA)
    assert jax.tree.structure(state) == jax.tree.structure(abstract)
    for a, x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert a.shape == x.shape and a.dtype == x.dtype and x.sharding == s == a.sharding
    kernel = state.params["encoder"]["layers"]["lin1"]["kernel"]  # [layers, embed, mlp]: embed over fsdp
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert state.extra["proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    # The optimizer covers the model and the extra modules: {"model", "extra"} in its moments.
    mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: isinstance(x, dict) and set(x) == {"model", "extra"})
    assert any(isinstance(m, dict) and "proj" in m["extra"] for m in mu)
    assert param_count(abstract.params) == param_count(state.params) > 0


@pytest.mark.slow
def test_extra_modules_draw_from_their_own_key_and_given_params_are_placed():
    mesh = shd.make_mesh(shd.MeshConfig(data=1), jax.devices()[:1])
    model = build_model(CFG)
    tx, _ = make_optimizer(OptimConfig(total_steps=10))
    rng = jax.random.PRNGKey(3)
    drawn, _ = init_train_state(model, rng, tx, mesh, extra_init=EXTRA)
    given_params = jax.tree.map(lambda x: np.full(x.shape, 0.5, x.dtype), jax.device_get(drawn.params))
    given, _ = init_train_state(model, rng, tx, mesh, params=given_params, extra_init=EXTRA)
    init_key, state_key = jax.random.split(rng)
    want = 0.02 * jax.random.normal(jax.random.fold_in(init_key, 1), (64, 32), jnp.float32)  # module 0: key 1
    # (within an ulp: the jitted init fuses the scaling with the draw)
    np.testing.assert_allclose(np.asarray(drawn.extra["proj"]["kernel"]), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(given.extra["proj"]["kernel"]), np.asarray(want), rtol=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(given.params), given_params)
    np.testing.assert_array_equal(np.asarray(given.rng), np.asarray(state_key))
    assert int(given.step) == 0
    # The optimizer state starts at zero moments over the trainable tree.
    zeros = jax.tree.map(jnp.zeros_like, trainable(given.params, given.extra))
    mu = given.opt_state[1].mu if hasattr(given.opt_state[1], "mu") else None
    assert mu is not None
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), mu, zeros)
