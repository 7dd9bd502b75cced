"""Names of places in a pytree: the same in memory and in orbax's metadata."""

import flax.linen as nn
import jax
import numpy as np
import optax

from jaxdistil.pytrees import path_str


def test_path_names():
    tree = {"a": [np.zeros(1), {"b": nn.Partitioned(np.zeros(2), names=("x",))}]}
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))]
    assert paths == ["a/0", "a/1/b"]
    boxed = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    assert boxed == ["a/0", "a/1/b"]  # a box's "value" is not part of the name
    state = optax.adam(1.0).init({"w": np.zeros(3)})
    assert [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)] == ["0/count", "0/mu/w", "0/nu/w"]
