"""Where each checkpoint tensor goes in a k25 model, and the two ways to put it there.

A *plan* is a list of `Placement`s: one checkpoint tensor (already in k25's orientation) written at a
position of the leading (stacked) axes of one k25 leaf, e.g. layer j / expert e of a stacked expert kernel.
`check_plan` validates it against the model's abstract state and the checkpoint (every slot filled once,
every checkpoint tensor used, errors naming the tensors). Then either

* `assemble` builds numpy leaves on the host (the plain load: host memory = the model), or
* `place_on_mesh` streams: each leaf starts as zeros in its sharding on the mesh, and every tensor is read,
  cast and written into its slot by a jitted shard_map update in which each device writes only its own
  block. Host memory holds one checkpoint tensor at a time (plus its converted copies), never a leaf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class Placement:
    path: tuple[str, ...]  # the k25 leaf (pure-dict path)
    index: tuple[int, ...]  # position along the leaf's leading axes
    name: str  # the logical checkpoint tensor it comes from (for errors and coverage)
    fetch: Callable[[], np.ndarray]  # reads it, shaped leaf.shape[len(index):]


def _flat(tree: dict) -> dict[tuple[str, ...], Any]:
    return {tuple(str(getattr(k, "key", k)) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _names(items: Iterable[str], n: int = 8) -> str:
    items = sorted(items)
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def check_plan(plan: list[Placement], abstract: dict, view, ignore: Callable[[str], bool] = lambda k: False) -> None:
    """Raise naming the tensors if the plan misses or invents tensors, or leaves a slot empty or doubly filled."""
    missing = {p.name for p in plan if p.name not in view}
    used = {s for p in plan if p.name in view for s in view.sources(p.name)}
    disk = view
    while hasattr(disk, "base"):  # the on-disk names behind the logical ones
        disk = disk.base
    unplaced = {k for k in set(disk.keys()) - used if not ignore(k)}
    if missing:
        raise ValueError(f"the checkpoint lacks tensor(s) {_names(missing)} that config.json implies. Tensors it "
                         f"holds that could not be placed: {_names(unplaced) or 'none'}. Check config.json "
                         "(layer / expert counts) against the weights, or the layout is not a supported one.")
    if unplaced:
        raise ValueError(f"could not place checkpoint tensor(s) {_names(unplaced)}: no k25 parameter takes them. "
                         "The layout is unknown, or config.json has fewer layers / experts than the weights.")
    want = _flat(abstract)
    by_path: dict[tuple[str, ...], list[Placement]] = {}
    for p in plan:
        by_path.setdefault(p.path, []).append(p)
    extra = set(by_path) - set(want)
    lacking = set(want) - set(by_path)
    if extra or lacking:
        raise ValueError(f"checkpoint does not match the model: no tensor for {_names('.'.join(x) for x in lacking)}"
                         f"; nowhere to put {_names('.'.join(x) for x in extra)}.")
    for path, items in by_path.items():
        shape = tuple(want[path].shape)
        k = len(items[0].index)
        if any(len(p.index) != k for p in items) or len({p.index for p in items}) != len(items) \
                or len(items) != math.prod(shape[:k]) \
                or any(not all(0 <= i < n for i, n in zip(p.index, shape)) for p in items):
            raise ValueError(f"{'.'.join(path)}: the checkpoint fills {len(items)} slot(s) of its leading axes "
                             f"{shape[:k]}; the config and the weights disagree on layer / expert counts.")


def _checked(p: Placement, shape: tuple[int, ...]) -> np.ndarray:
    x = p.fetch()
    want = shape[len(p.index):]
    if tuple(x.shape) != want:
        raise ValueError(f"checkpoint tensor {p.name} has shape {tuple(x.shape)} (as k25 lays it out), the config "
                         f"implies {want} for {'.'.join(p.path)}; check config.json against the weights.")
    return x


def assemble(plan: list[Placement], abstract: dict, progress: Callable | None = None) -> dict:
    """Host numpy pure dict (leaf dtypes) of the whole model from a checked plan."""
    want = _flat(abstract)
    leaves: dict[tuple[str, ...], np.ndarray] = {}
    for p in plan:
        leaf = want[p.path]
        if p.path not in leaves:
            leaves[p.path] = np.zeros(leaf.shape, leaf.dtype)
        leaves[p.path][p.index] = _checked(p, tuple(leaf.shape))
        if progress is not None:
            progress(p.name)
    out: dict = {}
    for path, arr in leaves.items():
        _set(out, path, arr)
    return out


@functools.cache
def _zeros_fn(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> Callable[[], jax.Array]:
    return jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=sharding)


def _zeros(shape: tuple[int, ...], dtype: Any, sharding: NamedSharding) -> jax.Array:
    """Zeros created on the devices in their sharding (never a host copy)."""
    return _zeros_fn(shape, np.dtype(dtype), sharding)()


@functools.cache
def _writer(mesh: Mesh, spec: tuple, nidx: int) -> Callable:
    """jit(shard_map): write a slot's block into each device's block of a sharded leaf (donated)."""

    def body(a: jax.Array, x: jax.Array, idx: jax.Array) -> jax.Array:
        starts, inside = [], jnp.bool_(True)
        for d in range(nidx):
            off = 0 if spec[d] is None else jax.lax.axis_index(spec[d]) * a.shape[d]
            local = idx[d] - off
            inside = inside & (local >= 0) & (local < a.shape[d])
            starts.append(local)
        block = x.reshape((1,) * nidx + x.shape).astype(a.dtype)

        def write(a):
            return jax.lax.dynamic_update_slice(a, block, (*starts, *([0] * (a.ndim - nidx))))

        return jax.lax.cond(inside, write, lambda a: a, a)

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(*spec), P(*spec[nidx:]), P()), out_specs=P(*spec),
                      check_vma=False)
    return jax.jit(f, donate_argnums=0)


def place_on_mesh(plan: list[Placement], abstract: dict, shardings: dict, progress: Callable | None = None) -> dict:
    """Pure dict of jax.Arrays in `shardings`, filled one checkpoint tensor at a time (see the module doc)."""
    want, where = _flat(abstract), _flat(shardings)
    by_path: dict[tuple[str, ...], list[Placement]] = {}
    for p in plan:
        by_path.setdefault(p.path, []).append(p)
    out: dict = {}
    for path, items in by_path.items():
        leaf, sharding = want[path], where[path]
        shape = tuple(leaf.shape)
        spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
        arr = _zeros(shape, leaf.dtype, sharding)
        for p in items:
            x = np.asarray(_checked(p, shape), leaf.dtype)
            xs = NamedSharding(sharding.mesh, P(*spec[len(p.index):]))
            xd = jax.make_array_from_callback(x.shape, xs, lambda i, x=x: x[i])
            del x
            arr = _writer(sharding.mesh, spec, len(p.index))(arr, xd, jnp.asarray(p.index, jnp.int32))
            if progress is not None:
                progress(p.name)
        _set(out, path, arr)
    return out


def abstract_state(model_cls: Callable, cfg: Any) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and abstract state of `model_cls(cfg)`, nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(0))))
