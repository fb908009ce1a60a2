"""ZeRO-1: optimizer state sharded across the data-parallel ranks, parameters kept in their layout.

Each optimizer-state leaf starts from its parameter's sharding and adds the data axes on one more
dimension: ("dp", "ep") for non-expert leaves (EP ranks are data parallel outside the MoE) and "dp"
alone for expert leaves, whose expert axis already lies on "ep". XLA then reduces gradients into the
owning shard and all-gathers the update when it is added to the (replicated) parameters.

Muon leaves are sharded on their *batch* axes first (stacked layers, experts), with fewer data axes if
that is what divides (K2's 60 layers take dp=2, not dp*ep=32): every rank then
orthogonalises whole matrices that it owns, so Newton–Schulz never sees a sharded matrix dimension
and needs no gather (the Distributed-Muon layout, with the gather needed only in the fallback where
no batch axis divides). AdamW leaves take the first dimension that divides.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k25.parallel.mesh import BATCH_AXES


def _dict_keys(path) -> tuple[str, ...]:
    return tuple(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))


def _param_specs(param_shardings: Any) -> dict[tuple[str, ...], P]:
    return {_dict_keys(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
        param_shardings, is_leaf=lambda x: isinstance(x, NamedSharding))}


def _lookup(specs: dict[tuple[str, ...], P], keys: tuple[str, ...]) -> P | None:
    for start in range(len(keys)):
        if keys[start:] in specs:
            return specs[keys[start:]]
    return None


def _used_axes(spec: list) -> set[str]:
    used: set[str] = set()
    for e in spec:
        if isinstance(e, tuple):
            used.update(e)
        elif e is not None:
            used.add(e)
    return used


def zero1_spec(shape: tuple[int, ...], base: P | None, mesh: Mesh, *, muon: bool, expert: bool) -> P:
    """The ZeRO-1 PartitionSpec for one optimizer-state leaf of `shape` whose parameter has spec `base`."""
    spec = list(base) + [None] * (len(shape) - len(base)) if base is not None else [None] * len(shape)
    candidates = ("dp",) if expert else BATCH_AXES
    free = [a for a in candidates if a not in _used_axes(spec) and mesh.shape[a] > 1]
    if not free or not shape:
        return P(*spec)
    # try all free data axes together, then each alone (largest first)
    options = [tuple(free)] + sorted(([a] for a in free), key=lambda a: -mesh.shape[a[0]])
    fits = lambda d, axes: spec[d] is None and shape[d] % math.prod(mesh.shape[a] for a in axes) == 0  # noqa: E731
    if muon:  # any batch dimension (even with fewer axes) before a matrix dimension
        batch_dims = list(range(max(len(shape) - 2, 0)))
        candidates = [(d, axes) for d in batch_dims for axes in options]
        candidates += [(d, axes) for axes in options for d in range(len(shape)) if d not in batch_dims]
    else:
        candidates = [(d, axes) for axes in options for d in range(len(shape))]
    for d, axes in candidates:
        if fits(d, axes):
            spec[d] = axes[0] if len(axes) == 1 else tuple(axes)
            return P(*spec)
    return P(*spec)


def zero1_shardings(opt_state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """NamedShardings for an (abstract) optax state tree under ZeRO-1."""
    specs = _param_specs(param_shardings)

    def one(path, leaf):
        keys = _dict_keys(path)
        label = jax.tree_util.keystr(path)
        base = _lookup(specs, keys)
        if base is None or not getattr(leaf, "shape", ()):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, zero1_spec(tuple(leaf.shape), base, mesh, muon="'muon'" in label,
                                              expert="experts" in keys))

    return jax.tree_util.tree_map_with_path(one, opt_state)
