"""k25.hf.load(mesh=...) streams a checkpoint onto 8 fake devices: equal to the plain load leaf for leaf, each
leaf in the sharding k25.parallel.mesh gives it, and host memory bounded by the largest tensor."""

import gc
import tracemalloc

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from model_leaves import leaves

from k25 import hf
from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.parallel.mesh import make_mesh, state_shardings

# 1 dense + 4 MoE layers of 16 experts: ~33 MB of float32 weights, the largest tensor 512 KB (embeddings). The
# tensors are large enough that the loader's per-tensor bookkeeping (~1 KB each: names, headers, the plan)
# stays small next to them.
CFG = tiny(vocab_size=512, hidden_size=256, num_hidden_layers=5, first_k_dense_replace=1, intermediate_size=384,
           moe_intermediate_size=128, n_routed_experts=16, num_experts_per_tok=2, n_group=1, topk_group=1,
           q_lora_rank=64, kv_lora_rank=32, dtype="float32")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("k2_stream")
    _, state = hf.abstract_state(K2Model, CFG)
    rng = np.random.default_rng(0)  # every leaf random, routing biases too
    model = hf.model_from_state(CFG, jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                                  nnx.to_pure_dict(state)))
    hf.save(model, str(path), max_shard_bytes=8 << 20)  # several files + index
    return str(path)


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(ml_collections.ConfigDict(dict(pp=2, dp=1, ep=4)))


def test_sharded_stream_equals_plain_load(checkpoint, mesh):
    plain = hf.load(checkpoint)
    with jax.set_mesh(mesh):  # the current mesh, as inside a training run
        sharded = hf.load(checkpoint)
    want = dict(jax.tree_util.tree_leaves_with_path(state_shardings(nnx.state(sharded), mesh)))
    got = leaves(sharded)
    assert set(got) == set(leaves(plain))
    specs = set()
    for path, ref in leaves(plain).items():
        arr = got[path]
        assert arr.sharding.is_equivalent_to(want[path], arr.ndim), jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(ref), err_msg=jax.tree_util.keystr(path))
        specs.add(tuple(arr.sharding.spec))
    assert any("ep" in s for s in specs) and any("pp" in s for s in specs)  # the test really shards


def _peak_host_bytes(fn) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        out = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    del out
    return peak


def test_streaming_host_memory_is_bounded_by_the_largest_tensor(checkpoint, mesh):
    """tracemalloc sees numpy's host buffers, not XLA's device buffers. Compiles are warmed up first so the
    measurement holds only data: streaming stays within a few copies of the largest tensor, while the plain
    load (which assembles the model on the host) is seen to hold the whole model."""
    sizes = {}
    hf.load(checkpoint, mesh=mesh, on_read=lambda k, a: sizes.__setitem__(k, a.nbytes))  # warm-up
    largest, total = max(sizes.values()), sum(sizes.values())
    assert total > 40 * largest
    streamed = _peak_host_bytes(lambda: hf.load(checkpoint, mesh=mesh))
    plain = _peak_host_bytes(lambda: hf.load(checkpoint))
    assert plain >= total
    print(f"host peak: streamed {streamed} B, plain {plain} B; largest tensor {largest} B, model {total} B")
    assert streamed <= 8 * largest, (streamed, largest, total)
