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

# logical axis -> mesh axis (None: replicated). One table for every parameter and activation.
LOGICAL_RULES: dict[str, Any] = {
    "layers": "pp",
    "exp": "ep",
    "batch": BATCH_AXES,
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


def state_shardings(state: nnx.State, mesh: Mesh) -> Any:
    """NamedShardings for an NNX State from each variable's `out_sharding` logical axes, as a pure dict.

    A mesh axis that does not divide its dimension is dropped (that dimension is replicated): e.g. K2's
    single dense layer, or 60 MoE layers, on pp=16 keep their `layers` axis whole.
    """
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    shapes = nnx.to_pure_dict(state)

    def sharding(spec: P, value: Any) -> NamedSharding:
        parts = []
        for dim, part in zip(np.shape(value), logical_to_spec(tuple(spec), mesh)):
            size = math.prod(mesh.shape[a] for a in (part if isinstance(part, tuple) else (part,))) if part else 1
            parts.append(part if dim % size == 0 else None)
        return NamedSharding(mesh, P(*parts))

    return jax.tree.map(sharding, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
