"""`k25.parallel.collectives.all_to_all_bits`: a 16-bit float all_to_all moved as uint16 bits is the plain
all_to_all, value and transpose, bit for bit, and the lowered collective carries ui16 (XLA:CPU widens a bf16 one
to f32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from k25.parallel.collectives import all_to_all_bits


@pytest.mark.parametrize("split,concat", [(0, 0), (1, 2)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_all_to_all_bits_equals_all_to_all(split, concat, dtype):
    mesh = Mesh(np.asarray(jax.devices()[:4]), ("x",))
    x = jax.random.normal(jax.random.key(0), (16, 8, 12)).astype(dtype)

    def run(f):
        g = jax.shard_map(f, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
        y, vjp = jax.vjp(g, x)
        ct = jax.random.normal(jax.random.key(1), y.shape).astype(dtype)
        return jax.jit(g).lower(x).as_text(), y, vjp(ct)[0]

    text, y, dx = run(lambda a: all_to_all_bits(a, "x", split, concat))
    _, want, want_dx = run(lambda a: jax.lax.all_to_all(a, "x", split, concat, tiled=True))
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(want_dx, np.float32))
    assert y.dtype == dx.dtype == dtype
    assert ("xui16>" in text) == (dtype == jnp.bfloat16)
