"""Comparing two NNX models leaf for leaf (every parameter and buffer, bit for bit)."""

import jax
import numpy as np
from flax import nnx


def leaves(model) -> dict:
    return dict(jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model))))


def assert_same_leaves(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert set(la) == set(lb)
    for path, leaf in la.items():
        np.testing.assert_array_equal(np.asarray(lb[path]), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))
