"""The device mesh and the logical-axis rules table: sizes, overrides, specs, divisibility, batch
placement (no compiles; 8 host CPU devices from conftest). The sharded step itself is tested in
tests/distill/test_meshes.py."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import HEADS, D, F, student_cfg

from jaxdistil.errors import UserError
from jaxdistil.models import DistilBertConfig, build_model
from jaxdistil.training import sharding as shd

S_CFG = student_cfg()




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
