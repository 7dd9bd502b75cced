"""Run checkpoints (jaxdistil.training.checkpoint): what is kept, restore onto another mesh, corrupt and
half-written checkpoints, and ``restore_params``. End-to-end resume is in tests/test_train.py."""

from __future__ import annotations

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdistil.errors import UserError
from jaxdistil.hf.load import restore_run_params as restore_params
from jaxdistil.models import DistilBertConfig, build_model, init_params, save_config
from jaxdistil.training.checkpoint import CheckpointConfig, RunCheckpointer
from jaxdistil.training.state import TrainState


def _mesh(shape, names):
    return jax.make_mesh(shape, names, devices=jax.devices()[: int(np.prod(shape))])


def _state(mesh, scale=1.0):
    """Toy params [16, 8] (split over data on axis 0) + an optimizer-like state."""
    split = NamedSharding(mesh, P(mesh.axis_names[0]))
    rep = NamedSharding(mesh, P())
    params = {
        "w": jax.device_put(scale * jnp.arange(128.0).reshape(16, 8), split),
        "b": jax.device_put(jnp.full((8,), scale), rep),
    }
    opt = {"mu": jax.tree.map(lambda x: x * 0.5, params), "count": jax.device_put(jnp.int32(7), rep)}
    return params, opt


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _train_state(step, params, opt, rng) -> TrainState:
    return TrainState(step=jnp.int32(step), params=params, opt_state=opt, rng=rng)


def _abstract_state(params, opt, params_sh=None, opt_sh=None) -> TrainState:
    """Restore target: the state's shapes on the given shardings (default: where they are)."""
    params_sh = params_sh or jax.tree.map(lambda x: x.sharding, params)
    opt_sh = opt_sh or jax.tree.map(lambda x: x.sharding, opt)
    rep = NamedSharding(jax.tree.leaves(params_sh)[0].mesh, P())
    return TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep), params=_abstract(params, params_sh),
                      opt_state=_abstract(opt, opt_sh), rng=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))


def test_save_restore_and_what_is_kept(tmp_path):
    mesh = _mesh((8,), ("data",))
    ckpt = RunCheckpointer(tmp_path, CheckpointConfig(keep=2, keep_best=1))
    for step in range(1, 6):
        params, opt = _state(mesh, scale=float(step))
        loss = {2: 0.5, 4: 0.9}.get(step)  # step 2 is the best evaluated one
        state = _train_state(step, params, opt, jax.random.PRNGKey(step))
        assert ckpt.save(state, data_state={"pos": step}, metric=loss)
    assert not ckpt.save(_train_state(5, params, opt, jax.random.PRNGKey(5)))  # never overwritten
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]  # latest 2, plus the best by eval loss

    restored = ckpt.restore(_abstract_state(params, opt))
    # The iterator state comes back as every saving process's state (one process here).
    assert restored.step == 5 and restored.data_states == [{"pos": 5}] and restored.meta["step"] == 5
    assert int(restored.state.step) == 5
    np.testing.assert_array_equal(np.asarray(restored.state.rng), np.asarray(jax.random.PRNGKey(5)))
    got = (restored.state.params, restored.state.opt_state)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves((params, opt))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    older = ckpt.restore(_abstract_state(params, opt), step=2)
    assert older.step == 2 and older.meta["eval_loss"] == 0.5
    np.testing.assert_array_equal(np.asarray(older.state.params["b"]), np.full(8, 2.0))
    ckpt.close()


def test_restore_onto_another_mesh(tmp_path):
    """Saved from data=8, restored onto fsdp=4 x tensor=2 with the target shardings."""
    params, opt = _state(_mesh((8,), ("data",)))
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(_train_state(3, params, opt, jax.random.PRNGKey(0)), data_state=b'{"bytes": 1}')
    ckpt.wait()
    mesh2 = _mesh((4, 2), ("fsdp", "tensor"))
    split = NamedSharding(mesh2, P("fsdp", "tensor"))
    rep = NamedSharding(mesh2, P())
    p_sh = {"w": split, "b": rep}
    restored = RunCheckpointer(tmp_path).restore(_abstract_state(params, opt, p_sh, {"mu": p_sh, "count": rep}))
    w = restored.state.params["w"]
    assert w.sharding == split and w.addressable_shards[0].data.shape == (4, 4)
    np.testing.assert_array_equal(np.asarray(w), np.asarray(params["w"]))
    np.testing.assert_array_equal(np.asarray(restored.state.opt_state["mu"]["w"]), np.asarray(opt["mu"]["w"]))
    assert restored.state.rng.sharding == rep
    assert restored.data_states == [b'{"bytes": 1}']  # grain DataLoader states are bytes


def test_corrupt_and_half_written_checkpoints(tmp_path, capsys):
    mesh = _mesh((8,), ("data",))
    params, opt = _state(mesh)
    ckpt = RunCheckpointer(tmp_path, CheckpointConfig(keep=5, keep_best=0))
    for step in (1, 2, 3):
        ckpt.save(_train_state(step, params, opt, jax.random.PRNGKey(step)))
    ckpt.close()
    # A save killed half-way leaves a temporary directory: never a step, removed on the next start.
    tmp = tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-99"
    (tmp / "params").mkdir(parents=True)
    # The latest complete step is damaged on disk.
    for f in (tmp_path / "checkpoints" / "3" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\0garbage")
    abstract = _abstract_state(params, opt)
    ckpt = RunCheckpointer(tmp_path, CheckpointConfig(keep=5, keep_best=0))
    assert ckpt.all_steps() == [1, 2, 3]
    restored = ckpt.restore(abstract)
    assert restored.step == 2
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert (
        len(warnings) == 1
        and "step 3 is unreadable" in warnings[0]
        and "falling back to step 2" in warnings[0]
    )
    assert ckpt.all_steps() == [1, 2] and len(list((tmp_path / "checkpoints-corrupt").iterdir())) == 1
    # Saving step 3 again works (the corrupt one was moved aside, not left in the way).
    assert ckpt.save(_train_state(3, params, opt, jax.random.PRNGKey(3)))
    ckpt.close()
    assert not tmp.exists()  # removed by the manager (in the background; saving waits for it)

    # Nothing readable left: one clear error.
    for step in ("1", "2", "3"):
        shutil.rmtree(tmp_path / "checkpoints" / step / "opt_state")
    with pytest.raises(UserError, match="no older checkpoint remains"):
        RunCheckpointer(tmp_path).restore(abstract)


def test_shape_mismatch_is_a_user_error_not_a_fallback(tmp_path):
    params, opt = _state(_mesh((8,), ("data",)))
    ckpt = RunCheckpointer(tmp_path)
    ckpt.save(_train_state(1, params, opt, jax.random.PRNGKey(0)))
    ckpt.save(_train_state(2, params, opt, jax.random.PRNGKey(0)))
    ckpt.wait()
    rep = NamedSharding(_mesh((8,), ("data",)), P())
    bigger = {"w": jnp.zeros((16, 9)), "b": jnp.zeros((8,))}
    abstract = _abstract_state(bigger, opt, {"w": rep, "b": rep}, jax.tree.map(lambda _: rep, opt))
    with pytest.raises(UserError, match=r"different model.*params/w: stored \(16, 8\) vs expected \(16, 9\)"):
        ckpt.restore(abstract)
    assert ckpt.all_steps() == [1, 2]  # nothing moved aside
    ckpt.close()


def test_restore_params(tmp_path):
    cfg = DistilBertConfig(
        vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16
    )
    shapes = jax.eval_shape(lambda: init_params(build_model(cfg), jax.random.PRNGKey(0)))
    rng = np.random.default_rng(0)
    params = [jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes) for _ in range(2)]
    save_config(cfg, tmp_path / "student")
    ckpt = RunCheckpointer(tmp_path)
    for step, p in zip((10, 20), params):
        ckpt.save(_train_state(step, jax.device_put(p), {"count": jnp.int32(step)}, jax.random.PRNGKey(0)))
    ckpt.close()

    step, got_cfg, got = restore_params(tmp_path)
    assert step == 20 and got_cfg == cfg
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params[1])):
        assert isinstance(a, np.ndarray)
        np.testing.assert_array_equal(a, b)
    step, _, got = restore_params(tmp_path, 10)
    np.testing.assert_array_equal(got["mlm_head"]["bias"], params[0]["mlm_head"]["bias"])
    with pytest.raises(UserError, match="no checkpoint at step 15"):
        restore_params(tmp_path, 15)
    with pytest.raises(UserError, match="not a jaxdistil run directory"):
        restore_params(tmp_path / "checkpoints")
    os.makedirs(tmp_path / "empty" / "student")
    save_config(cfg, tmp_path / "empty" / "student")
    with pytest.raises(UserError, match="no checkpoint yet"):
        restore_params(tmp_path / "empty")
