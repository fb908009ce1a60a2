"""The device mesh and the one table that maps logical parameter/activation axes onto it.

Mesh axes: `pp` (pipeline stages), `dp` (data parallel), `ep` (expert parallel). Outside the MoE
the `ep` ranks act as more data parallelism, so batches are split over ("dp", "ep").
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("pp", "dp", "ep")
BATCH_AXES = ("dp", "ep")
# the vocab dimension of the embedding table and LM head under `K2Config.shard_vocab` (k25/parallel/vocab.py)
VOCAB_SHARD = "vocab_shard"

# logical axis -> mesh axis (None: replicated). One table for every parameter and activation.
LOGICAL_RULES: dict[str, Any] = {
    "layers": "pp",
    "exp": "ep",
    "batch": BATCH_AXES,
    VOCAB_SHARD: AXES,
    "embed": None, "vocab": None, "mlp": None, "heads_q": None, "q_lora": None, "kv_lora": None,
    "exp_mlp": None, "norm": None,
}


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """Mesh of shape (pp, dp, ep) from `config.mesh`; the product must equal the device count.

    `config.mesh.devices` (0 = all) uses only the first N devices, e.g. a 1-device debug run on a host
    that has more.
    """
    devices = devices if devices is not None else jax.devices()
    n = int(mesh_cfg.get("devices", 0) or 0)
    if n:
        if n > len(devices):
            raise ValueError(f"config.mesh.devices={n} but only {len(devices)} devices are available.")
        devices = devices[:n]
    shape = tuple(int(mesh_cfg[a]) for a in AXES)
    if any(s < 1 for s in shape):
        raise ValueError(f"config.mesh: pp/dp/ep must be >= 1, got {dict(zip(AXES, shape))}.")
    if math.prod(shape) != len(devices):
        raise ValueError(f"config.mesh: pp*dp*ep = {math.prod(shape)} but {len(devices)} devices are available; "
                         f"set --config.mesh.pp/dp/ep so their product is {len(devices)} "
                         "(or --config.mesh.devices to use fewer).")
    return Mesh(np.asarray(devices).reshape(shape), AXES)


def logical_to_spec(axes: tuple[str | None, ...] | None, mesh: Mesh) -> P:
    """PartitionSpec for a tuple of logical axis names, dropping mesh axes of size 1."""
    if not axes:
        return P()
    out = []
    for a in axes:
        m = LOGICAL_RULES.get(a) if a is not None else None
        if isinstance(m, tuple):
            m = tuple(x for x in m if mesh.shape[x] > 1) or None
        elif m is not None and mesh.shape[m] == 1:
            m = None
        out.append(m)
    return P(*out)


def _size(mesh: Mesh, part: Any) -> int:
    return math.prod(mesh.shape[a] for a in (part if isinstance(part, tuple) else (part,))) if part else 1


def storage_spec(shape: tuple[int, ...], logical: tuple[str | None, ...], mesh: Mesh) -> P:
    """How a parameter of `shape` with logical axes `logical` is stored on `mesh`.

    A mesh axis that does not divide its dimension cannot shard it (jax shards evenly). For `pp` on a stack's
    `layers` axis (K2: 60 MoE layers or 1 dense layer on 16 stages) replicating would put every stage's copy
    of the whole stack on every stage (253.7 GB of K2's experts per device instead of 15.9 GB), so `pp`
    moves to the largest other free dimension that it divides (ZeRO-3 style over the stages): the stack is
    stored 1/pp per device, the pipeline regroups its chunks onto their stages with one all-to-all
    (`_to_stages` in k25/parallel/pipeline.py, given these specs) and layers run outside the pipeline gather
    one layer at a time. Any other axis that does not divide is replicated.
    """
    parts = list(logical_to_spec(tuple(logical), mesh)) + [None] * (len(shape) - len(logical))
    moved = []
    for d, part in enumerate(parts):
        if part and shape[d] % _size(mesh, part):
            parts[d] = None
            if part == "pp":
                moved.append(d)
    if moved and "pp" in mesh.shape:
        free = [d for d in range(len(shape)) if parts[d] is None and d not in moved
                and shape[d] % mesh.shape["pp"] == 0]
        if free:
            parts[max(free, key=lambda d: (shape[d], d))] = "pp"
    return P(*parts)


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings for an NNX State from each variable's `out_sharding` logical axes (`storage_spec`)."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)

    def sharding(spec: P, value: Any) -> NamedSharding:
        return NamedSharding(mesh, storage_spec(np.shape(value), tuple(spec), mesh))

    return jax.tree.map(sharding, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
