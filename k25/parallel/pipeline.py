"""Pipeline parallelism over the `pp` mesh axis: gpipe, and interleaved 1F1B with an explicit backward.

The pipelined part of a model is a stack of L identical layers (stacked pure-dict parameters, leading axis
L in layer order), cut into p*v chunks of L/(p*v) layers; chunk j = r*p + s runs on stage s (circular
repeats, see k25/parallel/schedule.py). Before the pipeline the caller has split the batch into m
microbatches `x (m, mb, ...)`; after the last chunk, `head_fn` turns a microbatch's output into its summed
loss, on the last stage, as soon as that microbatch is done. `pipeline_loss` returns the loss summed over
microbatches and the stage/head statistics, and is differentiable w.r.t. the stage parameters, the head
parameters and `x`:

  * `gpipe`: the tick loop runs the forwards only; `jax.grad` differentiates through it (all forwards,
    then the backward replaying the ticks in reverse), so autodiff keeps every tick's residuals alive.
  * `1f1b`: a `jax.custom_vjp` whose forward *is* the whole one-forward-one-backward tick loop. A forward
    unit calls `jax.vjp` on its chunk and parks the residual leaves of the returned VJP in a slot buffer;
    the unit's backward, ticks later, rebuilds the VJP from the slot and applies it to the cotangent that
    came back from the next stage (or from the loss head). Gradients are accumulated per chunk as the loop
    goes, and the custom_vjp's backward only scales them by the incoming cotangent. Live residuals are
    bounded by the schedule's slots (at most (p - s - 1) + (v - 1)*p + 1 units on stage s), not by m.
    Residual leaves that *are* the chunk's parameters are not stored; the backward selects them again.

How the stages run: `jax.shard_map` over `pp` only (`axis_names={"pp"}`), so inside a stage the dp/ep axes
stay automatic and the model code is the ordinary, unpipelined code, including the expert-parallel MoE,
whose own `shard_map` over dp/ep nests inside this one (k25/parallel/expert.py). Each tick a stage reads
its instruction from the static schedule table and `lax.switch`es to idle / forward / backward (then a
`lax.cond` runs the loss head when a microbatch has just left the last chunk), so an idle stage really
skips the work (a `vmap` over stages, MaxText's choice, would run every branch on every stage and select);
activations and cotangents move one stage per tick by `ppermute`. A single stage (pp=1, microbatching
only) runs the same loop without a shard_map.

The outer shard_map uses `check_vma=False`. With jax 0.10.2's default `check_vma=True`, differentiating
the nested expert-parallel shard_map fails to lower: `ShapedArray.nospec` names a residual's varying axes
in mesh order, ("pp", "dp", "ep"), and Shardy rejects the inner manual computation because the outer
manual axis `pp` comes before its own `dp` (a case jax's core.py leaves unhandled). Without vma checking the outer
residuals carry no `pp` annotation and the nested shard_map lowers. The code here does not depend on
vma-typed transposes: values cross stages only through `ppermute` (its transpose is the reverse
permutation) and leave the shard_map stacked per stage (`out_specs=P("pp")`); inputs replicated over pp
get their cotangents psummed by the shard_map transpose, which is what they need.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from k25.parallel import schedule as sched
from k25.parallel.collectives import all_to_all_bits
from k25.parallel.schedule import Schedule

PP = "pp"
# Trace-time record of the last traced 1F1B loop's residual slots (for plans: k25.train.loop.plan):
# {"slot_bytes_per_stage": bytes of the slot buffers on one stage (global over the stage's dp/ep devices),
#  "unit_bytes_per_stage": one unit's residuals, "slots": res_slots, "offload": bool}
TRACED_SLOTS: dict[str, Any] = {}
_PARAMS = "pipeline_chunk_params"  # checkpoint name: gpipe recomputes the chunk slice instead of saving it

# stage_fn(chunk_params, chunk_buffers, x, side_i) -> (y, aux dict of per-layer stats, stacked over the chunk)
StageFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, dict]]
# head_fn(head_params, y, head_data_i) -> (loss_sum, aux dict of scalars)
HeadFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, dict]]


def _take(tree: Any, i: jax.Array) -> Any:
    """Row i of every leaf (dynamic index along axis 0)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _put(buf: jax.Array, k: jax.Array, value: jax.Array) -> jax.Array:
    """buf[k] = value where k >= 0; unchanged for k = -1 (rewrites slot 0 with itself)."""
    k0 = jnp.maximum(k, 0)
    return buf.at[k0].set(jnp.where(k >= 0, value, buf[k0]))


def _merge_aux(acc: dict, new: dict) -> dict:
    """Microbatch statistics: keys starting with `max_` take the maximum, the rest add (as k25.train.step)."""
    return {k: jnp.maximum(acc[k], new[k]) if k.startswith("max_") else acc[k] + new[k] for k in acc}


def _aux_init(shapes: dict) -> dict:
    return {k: jnp.full(s.shape, -jnp.inf if k.startswith("max_") else 0, s.dtype) for k, s in shapes.items()}


def _to_stages(tree: Any, p: int, v: int, storage: Any = None) -> Any:
    """(L, ...) in layer order -> (p, v, L/(p*v), ...): chunk j = r*p + s goes to [s, r].

    `storage` (same structure, a PartitionSpec or None per leaf): how each leaf is stored. A leaf stored with
    `pp` on a dimension other than its layer axis (k25.parallel.mesh.storage_spec, when L does not divide
    into the stages) is regrouped by one tiled `all_to_all` over `pp`, in a shard_map manual over every
    axis so that its other shardings (experts on `ep`) stay put: each stage sends every other stage that
    stage's chunks' slice and receives its own chunks whole. The transpose (gradients) is the reverse
    all_to_all. Other leaves are reshaped and left to the partitioner.
    """
    def regroup(a: jax.Array, spec: P | None) -> jax.Array:
        a = a.reshape(v, p, a.shape[0] // (p * v), *a.shape[1:])
        rest = tuple(spec)[1:] if spec is not None else ()
        if spec is None or PP not in rest:
            return jnp.swapaxes(a, 0, 1)
        k = 3 + rest.index(PP)  # the pp-sharded dimension after the reshape

        def body(x):  # (v, p, n, ..., D/p, ...) -> (1, v, n, ..., D, ...)
            return jnp.swapaxes(all_to_all_bits(x, PP, 1, k), 0, 1)

        return jax.shard_map(body, in_specs=P(None, None, None, *rest),
                             out_specs=P(PP, None, None, *_stage_rest(rest)))(a)

    specs = jax.tree.map(lambda _: None, tree) if storage is None else storage
    return jax.tree.map(regroup, tree, specs, is_leaf=lambda x: x is None)


def _stage_rest(rest: tuple, d: int | None = None, axis: str | None = None) -> tuple:
    """A stored leaf's non-layer specs on its stage (the `pp` dimension whole), with `axis` on dimension d."""
    return tuple(axis if j == d else (None if part == PP else part) for j, part in enumerate(rest))


def grad_shard_dims(stage_params: Any, storage: Any, axis: str | None) -> Any:
    """Per stage leaf, the non-layer dimension (index into shape[1:]) on which the 1F1B loop keeps its gradient
    sum sharded over the auto mesh axis `axis`, or None: only leaves the pipeline regroups by all_to_all
    (stored with `pp` off the layer axis), on their largest dimension that is unsharded and divisible. All
    None without `axis`, storage specs or an ambient mesh that has it."""
    mesh = jax.sharding.get_abstract_mesh()
    size = 0 if axis is None or mesh.empty or axis not in mesh.axis_names else mesh.shape[axis]

    def pick(a: Any, spec: P | None) -> int | None:
        rest = tuple(spec)[1:] if spec is not None else ()
        if size < 2 or PP not in rest:
            return None
        free = [j for j in range(len(a.shape) - 1)
                if (j >= len(rest) or rest[j] is None) and a.shape[1 + j] % size == 0]
        return max(free, key=lambda j: (a.shape[1 + j], j)) if free else None

    specs = jax.tree.map(lambda _: None, stage_params) if storage is None else storage
    return jax.tree.map(pick, stage_params, specs, is_leaf=lambda x: x is None)


def _grads_from_stages(grads: Any, params: Any, p: int, v: int, storage: Any, dims: Any,
                       axis: str | None) -> Any:
    """Gradient sums in the stage layout (p, v, n, ...) -> the stored layout (L, ...) of `params`: the
    transpose of `_to_stages`, except that a leaf with a dimension in `dims` (`grad_shard_dims`; all None
    without `axis`) stays sharded over `axis` on it throughout (the reverse all_to_all runs on the sharded
    blocks), so its full sum is never built on a device."""
    def back(g: jax.Array, a: jax.Array, spec: P | None, d: int | None) -> jax.Array:
        if d is None:
            _, vjp = jax.vjp(lambda t: _to_stages(t, p, v, spec), a)
            return vjp(g)[0]
        rest = tuple(spec)[1:]
        rest = rest + (None,) * (g.ndim - 3 - len(rest))
        k = 3 + rest.index(PP)

        def body(x):  # (1, v, n, ..., D, ...) -> (v, p, n, ..., D/p, ...)
            return jax.lax.all_to_all(jnp.swapaxes(x, 0, 1), PP, k, 1, tiled=True)

        out = jax.shard_map(body, in_specs=P(PP, None, None, *_stage_rest(rest, d, axis)),
                            out_specs=P(None, None, None, *tuple(axis if j == d else part
                                                                  for j, part in enumerate(rest))))(g)
        return out.reshape(-1, *out.shape[3:])

    specs = jax.tree.map(lambda _: None, grads) if storage is None else storage
    return jax.tree.map(back, grads, params, specs, dims, is_leaf=lambda x: x is None)


def _from_stages(tree: Any) -> Any:
    """Inverse of `_to_stages`."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1).reshape(-1, *a.shape[3:]), tree)


class _Tick:
    """One stage's view of the tick loop. A schedule's subclass supplies `init()` (the loop carry) and
    `tick(carry, row) -> (carry, output sent to the next stage, cotangent sent to the previous one)`.

    Only small values go into the `lax.switch` / `lax.cond` that pick a tick's work: the buffers (inputs,
    cotangents, residuals, gradient sums) are sliced before and updated after, by the slot the table names
    (-1: leave unchanged), so a conditional never has to carry, and copy, a whole buffer.
    """

    def __init__(self, s: Schedule, me: jax.Array, stage_fn: StageFn, head_fn: HeadFn, sp: Any, sb: Any, hp: Any,
                 x: jax.Array, side: Any, hdata: Any):
        self.s, self.stage_fn, self.head_fn = s, stage_fn, head_fn
        self.sp, self.sb, self.hp, self.x, self.side, self.hdata = sp, sb, hp, x, side, hdata
        self.me = me  # this stage's index
        x0, side0 = x[0], _take(side, 0)
        y_shape, self.aux_shapes = jax.eval_shape(lambda p, b: stage_fn(p, b, x0, side0), _take(sp, 0), _take(sb, 0))
        if (y_shape.shape, y_shape.dtype) != (x0.shape, x0.dtype):
            raise ValueError(f"a pipeline chunk must map {x0.shape} {x0.dtype} activations to the same shape and "
                             f"dtype (they travel between stages in fixed buffers); got {y_shape}.")
        _, self.head_aux_shapes = jax.eval_shape(lambda h: head_fn(h, x0, _take(hdata, 0)), hp)
        self.zero = jnp.zeros(x.shape[1:], x.dtype)

    def common_init(self) -> dict:
        s = self.s
        return {"xbuf": jnp.zeros((max(s.x_slots, 1), *self.x.shape[1:]), self.x.dtype),
                "aux": _aux_init({k: jax.ShapeDtypeStruct((s.virtual, *a.shape), a.dtype)
                                  for k, a in self.aux_shapes.items()}),
                "head_aux": _aux_init(self.head_aux_shapes), "loss": jnp.zeros((), jnp.float32)}

    def unit_input(self, c: dict, row: jax.Array) -> jax.Array:
        """The chunk's input: the microbatch itself for the first chunk, else what waits in the x buffer."""
        fresh = jnp.asarray(self.x)[jnp.maximum(row[sched.MICRO], 0)]
        held = c["xbuf"][jnp.maximum(row[sched.X_SLOT], 0)]
        return jnp.where(row[sched.X_SLOT] < 0, fresh, held)

    def chunk_call(self, r: jax.Array, i: jax.Array) -> Callable[[Any, jax.Array], tuple[jax.Array, dict]]:
        """(chunk params, x) -> chunk output and stats, for repeat r and microbatch i."""
        b, side = _take(self.sb, r), _take(self.side, i)
        return lambda p, x: self.stage_fn(p, b, x, side)

    def record(self, c: dict, row: jax.Array, aux: dict, loss: jax.Array, head_aux: dict) -> dict:
        """Fold a forward's stats into its chunk's row and a head's loss into the sums (no-ops otherwise)."""
        op, r = row[sched.OP], jnp.maximum(row[sched.CHUNK], 0)
        is_fwd, is_head = (op == sched.FWD) | (op == sched.FWD_HEAD), op == sched.FWD_HEAD
        old = _take(c["aux"], r)
        new = jax.tree.map(lambda a, b: jnp.where(is_fwd, a, b), _merge_aux(old, aux), old)
        head = jax.tree.map(lambda a, b: jnp.where(is_head, a, b), _merge_aux(c["head_aux"], head_aux),
                            c["head_aux"])
        return dict(c, aux={k: c["aux"][k].at[r].set(v) for k, v in new.items()}, head_aux=head,
                    loss=c["loss"] + jnp.where(is_head, loss, 0.0))

    def zeros_like_shapes(self, shapes: Any) -> Any:
        return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


class _GPipeTick(_Tick):
    """Forward-only ticks; autodiff supplies the backward."""

    def init(self) -> dict:
        return self.common_init()

    def tick(self, c: dict, row: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
        r, i = jnp.maximum(row[sched.CHUNK], 0), jnp.maximum(row[sched.MICRO], 0)

        def unit(sp, x):  # the chunk's parameters are re-sliced in the backward, not saved per tick
            p = jax.tree.map(lambda a: checkpoint_name(a, _PARAMS), _take(sp, r))
            return self.chunk_call(r, i)(p, x)

        def forward(x):
            policy = jax.checkpoint_policies.save_anything_except_these_names(_PARAMS)
            return jax.checkpoint(unit, policy=policy)(self.sp, x)

        def idle(x):
            return self.zero, self.zeros_like_shapes(self.aux_shapes)

        y, aux = jax.lax.switch(row[sched.OP], [idle, forward, forward, idle], self.unit_input(c, row))
        last = row[sched.OP] == sched.FWD_HEAD  # the microbatch left the last chunk: its loss, here
        loss, head_aux = jax.lax.cond(
            last, lambda y: self.head_fn(self.hp, y, _take(self.hdata, i)),
            lambda y: (jnp.zeros((), jnp.float32), self.zeros_like_shapes(self.head_aux_shapes)), y)
        return self.record(c, row, aux, loss, head_aux), jnp.where(last, self.zero, y), self.zero


class _OneFOneBTick(_Tick):
    """Forward and backward units; the forward's VJP residuals wait in slots for the backward."""

    def __init__(self, *args: Any, offload: bool = False, grad_dtypes: Any = None, grad_specs: Any = None,
                 unit_specs: Any = None):
        super().__init__(*args)
        self.offload = offload
        # per stage leaf, a PartitionSpec (auto axes) its gradient sum is kept in, or None (see `pipeline_loss`),
        # and the spec of one unit's gradient of that leaf (the same without the sum's sharded axis)
        self.grad_specs = jax.tree.map(lambda _: None, self.sp) if grad_specs is None else grad_specs
        self.unit_specs = jax.tree.map(lambda _: None, self.sp) if unit_specs is None else unit_specs
        # the gradient sums' dtype per stage leaf (the stored parameters' when the stages hold a cast copy)
        self.grad_dtypes = jax.tree.map(lambda a: a.dtype, self.sp) if grad_dtypes is None else grad_dtypes
        x0, side0 = self.x[0], _take(self.side, 0)
        p0, b0 = _take(self.sp, 0), _take(self.sb, 0)
        found: dict[str, Any] = {}

        def residuals(p, x):
            y, vjp_fn, aux = jax.vjp(lambda p, x: self.stage_fn(p, b0, x, side0), p, x, has_aux=True)
            leaves, found["treedef"] = jax.tree.flatten(vjp_fn)
            found["from_params"] = self._param_positions(p, leaves)
            return [leaf for leaf, k in zip(leaves, found["from_params"]) if k < 0]

        self.res_shapes = jax.eval_shape(residuals, p0, x0)
        self.treedef, self.from_params = found["treedef"], found["from_params"]
        unit = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in self.res_shapes)
        TRACED_SLOTS.clear()
        TRACED_SLOTS.update(unit_bytes_per_stage=unit, slots=max(self.s.res_slots, 1), offload=offload,
                            slot_bytes_per_stage=unit * max(self.s.res_slots, 1))

    def _to_host(self, a: jax.Array) -> jax.Array:
        """With offload, the residual slots live in pinned host memory: a value is moved there when it is
        parked and back when its backward reads it (`jax.memory.Space`, the memory kinds of the backend)."""
        return jax.device_put(a, jax.memory.Space.Host) if self.offload else a

    def _to_device(self, a: jax.Array) -> jax.Array:
        return jax.device_put(a, jax.memory.Space.Device) if self.offload else a

    @staticmethod
    def _slot_dtype(dtype: Any) -> Any:
        """float8 residuals are parked as their uint8 bit patterns: XLA:CPU has no float8 dynamic-update-slice,
        so it widens the whole slot buffer to f16 and back each tick, which also copies it (a second 23.6 GB
        buffer in the K2 layout); integer slots are updated in place, and the bits round-trip exactly."""
        return jnp.uint8 if jnp.issubdtype(dtype, jnp.floating) and jnp.dtype(dtype).itemsize == 1 else dtype

    def _park(self, v: jax.Array) -> jax.Array:
        t = self._slot_dtype(v.dtype)
        return self._to_host(v if t == v.dtype else jax.lax.bitcast_convert_type(v, t))

    def _unpark(self, a: jax.Array, dtype: Any) -> jax.Array:
        a = self._to_device(a)
        return a if a.dtype == dtype else jax.lax.bitcast_convert_type(a, dtype)

    @staticmethod
    def _constrain(grads: Any, specs: Any) -> Any:
        return jax.tree.map(lambda g, spec: g if spec is None else jax.lax.with_sharding_constraint(g, spec),
                            grads, specs, is_leaf=lambda x: x is None)

    @staticmethod
    def _param_positions(p: Any, leaves: list) -> tuple[int, ...]:
        """For each VJP residual leaf, the index of the parameter leaf it is (identity), else -1."""
        ids = {id(a): k for k, a in enumerate(jax.tree.leaves(p))}
        return tuple(ids.get(id(leaf), -1) for leaf in leaves)

    def init(self) -> dict:
        s, x = self.s, self.x
        return {**self.common_init(),
                "gbuf": jnp.zeros((max(s.g_slots, 1), *x.shape[1:]), x.dtype),
                "res": [self._to_host(jnp.zeros((max(s.res_slots, 1), *a.shape), self._slot_dtype(a.dtype)))
                        for a in self.res_shapes],
                "grad": self._constrain(jax.tree.map(lambda a, t: jnp.zeros(a.shape, t), self.sp, self.grad_dtypes),
                                        self.grad_specs),
                "head_grad": jax.tree.map(jnp.zeros_like, self.hp),
                "dx": jnp.zeros_like(x)}

    def forward(self, r: jax.Array, i: jax.Array, x: jax.Array, g: jax.Array, res: list) -> tuple:
        p = _take(self.sp, r)
        y, vjp_fn, aux = jax.vjp(self.chunk_call(r, i), p, x, has_aux=True)
        leaves = jax.tree.leaves(vjp_fn)
        if self._param_positions(p, leaves) != self.from_params:
            raise RuntimeError("pipeline 1f1b: the chunk's VJP residuals changed structure between traces.")
        stored = [leaf for leaf, j in zip(leaves, self.from_params) if j < 0]
        return y, stored, aux, jax.tree.map(jnp.zeros_like, p), self.zero

    def backward(self, r: jax.Array, i: jax.Array, x: jax.Array, g: jax.Array, res: list) -> tuple:
        params = jax.tree.leaves(_take(self.sp, r))
        stored = iter(res)
        vjp_fn = jax.tree.unflatten(self.treedef, [params[j] if j >= 0 else next(stored) for j in self.from_params])
        dp, dx = vjp_fn(g)
        return self.zero, self.zeros_like_shapes(self.res_shapes), self.zeros_like_shapes(self.aux_shapes), dp, dx

    def idle(self, r: jax.Array, i: jax.Array, x: jax.Array, g: jax.Array, res: list) -> tuple:
        return (self.zero, self.zeros_like_shapes(self.res_shapes), self.zeros_like_shapes(self.aux_shapes),
                jax.tree.map(jnp.zeros_like, _take(self.sp, r)), self.zero)

    def head(self, y: jax.Array, i: jax.Array) -> tuple:
        """Loss of the finished microbatch, its stats, the head's gradient and the cotangent for y."""
        loss, head_vjp, haux = jax.vjp(lambda hp, y: self.head_fn(hp, y, _take(self.hdata, i)), self.hp, y,
                                       has_aux=True)
        dhp, dy = head_vjp(jnp.ones_like(loss))
        return loss, haux, dhp, dy.astype(self.x.dtype)

    def no_head(self, y: jax.Array, i: jax.Array) -> tuple:
        return (jnp.zeros((), jnp.float32), self.zeros_like_shapes(self.head_aux_shapes),
                jax.tree.map(jnp.zeros_like, self.hp), self.zero)

    def tick(self, c: dict, row: jax.Array) -> tuple[dict, jax.Array, jax.Array]:
        op, r, i = row[sched.OP], jnp.maximum(row[sched.CHUNK], 0), jnp.maximum(row[sched.MICRO], 0)
        slot, g_slot = row[sched.RES_SLOT], row[sched.G_SLOT]
        is_fwd, is_bwd, last = (op == sched.FWD) | (op == sched.FWD_HEAD), op == sched.BWD, op == sched.FWD_HEAD
        g = c["gbuf"][jnp.maximum(g_slot, 0)]
        res = [self._unpark(buf[jnp.maximum(slot, 0)], a.dtype) for buf, a in zip(c["res"], self.res_shapes)]
        y, stored, aux, dp, dx = jax.lax.switch(op, [self.idle, self.forward, self.forward, self.backward],
                                                r, i, self.unit_input(c, row), g, res)
        loss, head_aux, dhp, dy = jax.lax.cond(last, self.head, self.no_head, y, i)
        first = is_bwd & (r == 0) & (self.me == 0)  # the gradient w.r.t. the pipeline input, kept here
        c = dict(self.record(c, row, aux, loss, head_aux),
                 res=[_put(buf, jnp.where(is_fwd, slot, -1), self._park(v)) for buf, v in zip(c["res"], stored)],
                 gbuf=_put(c["gbuf"], jnp.where(last, g_slot, -1), dy),
                 # a unit's gradient is constrained whole before it is added to the dp-sharded sum, so its
                 # partial sums over the data ranks are reduced as they are: left to propagation, the sum's
                 # sharding reached the weight-gradient matmuls and XLA gathered their activations over every data
                 # rank instead (f32[32, 4096, 16384] and f32[32, 4096, 12288] per device in the K2 layout)
                 grad=self._constrain(jax.tree.map(lambda acc, d: acc.at[r].add(d.astype(acc.dtype)), c["grad"],
                                                   self._constrain(dp, self.unit_specs)), self.grad_specs),
                 head_grad=jax.tree.map(jnp.add, c["head_grad"], dhp),
                 dx=_put(c["dx"], jnp.where(first, i, -1), dx))
        return c, jnp.where(last, self.zero, y), jnp.where(first, self.zero, dx)


def _run(s: Schedule, tick_cls: Callable[..., _Tick], stage_fn: StageFn, head_fn: HeadFn, sp: Any, sb: Any,
         hp: Any, x: jax.Array, side: Any, hdata: Any) -> dict:
    """The shard_map'd tick loop; returns the final carry (plus `activity`), stacked over stages.

    With one stage there is nothing to map: the loop runs as plain code (a shard_map over a size-1 `pp`
    leaves the psums of its transpose outside manual mode, which XLA's SPMD partitioner rejects).
    """
    p = s.stages
    table = np.asarray(s.table)
    fwd_perm = [(k, (k + 1) % p) for k in range(p)]
    bwd_perm = [(k, (k - 1) % p) for k in range(p)]

    def shift(a: jax.Array, perm: list[tuple[int, int]]) -> jax.Array:
        return a if p == 1 else jax.lax.ppermute(a, PP, perm)

    def body(sp, sb, hp, x, side, hdata):
        sp, sb = jax.tree.map(lambda a: a[0], (sp, sb))
        me = jnp.int32(0) if p == 1 else jax.lax.axis_index(PP)
        t = tick_cls(s, me, stage_fn, head_fn, sp, sb, hp, x, side, hdata)

        def step(c, rows):
            row = rows[t.me]
            c, send_f, send_b = t.tick(c, row)
            c = dict(c, xbuf=_put(c["xbuf"], row[sched.RECV_X], shift(send_f, fwd_perm)))
            if "gbuf" in c:
                c = dict(c, gbuf=_put(c["gbuf"], row[sched.RECV_G], shift(send_b, bwd_perm)))
            return c, row[sched.OP]

        c, activity = jax.lax.scan(step, t.init(), jnp.asarray(table))
        c = {k: v for k, v in c.items() if k not in ("xbuf", "gbuf", "res")}
        return jax.tree.map(lambda a: a[None], dict(c, activity=activity))

    if p == 1:
        return body(sp, sb, hp, x, side, hdata)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or PP not in mesh.axis_names:
        raise ValueError("the pipeline runs over the `pp` axis of the ambient mesh: trace it under "
                         "`with jax.set_mesh(mesh):` with a mesh from k25.parallel.mesh.make_mesh.")
    if mesh.shape[PP] != p:
        raise ValueError(f"schedule for {p} stages but the mesh has pp={mesh.shape[PP]}.")
    return jax.shard_map(body, mesh=mesh, in_specs=(P(PP), P(PP), P(), P(), P(), P()), out_specs=P(PP),
                         axis_names={PP}, check_vma=False)(sp, sb, hp, x, side, hdata)


def _outputs(s: Schedule, out: dict) -> tuple[jax.Array, dict, dict, jax.Array]:
    """(loss, stage aux in layer order, head aux, activity (p, ticks)) from the stacked carry."""
    last = s.stages - 1
    return out["loss"][last], _from_stages(out["aux"]), jax.tree.map(lambda a: a[last], out["head_aux"]), \
        out["activity"]


def pipeline_loss(s: Schedule, stage_fn: StageFn, head_fn: HeadFn, stage_params: Any, stage_buffers: Any,
                  head_params: Any, x: jax.Array, side: Any, head_data: Any, storage: tuple[Any, Any] | None = None,
                  offload: bool = False, regroup_dtypes: Any = None, grad_shard_axis: str | None = None
                  ) -> tuple[jax.Array, dict]:
    """Summed loss over microbatches and aux {stage stats in layer order, head stats, `pipeline/activity`}.

    stage_params / stage_buffers: stacked (L, ...) in layer order, L divisible by s.stages * s.virtual.
    x (m, mb, ...): the microbatched pipeline input; side / head_data: pytrees with a leading m axis, row i
    passed to stage_fn / head_fn for microbatch i. Differentiable w.r.t. stage_params, head_params and x.
    `pipeline/activity` (p, ticks) holds the op each stage ran at each tick (schedule.IDLE/FWD/...).
    `storage`: for (stage_params, stage_buffers), each leaf's stored PartitionSpec (see `_to_stages`); None
    leaves it to the partitioner. `offload` (1f1b): the residual slots are kept in pinned host memory.
    `regroup_dtypes` (1f1b; same structure as stage_params, a dtype or None per leaf): leaves that the stage
    function only ever uses cast to that dtype are cast *before* the regrouping, so the stages' copy of them
    (and the all_to_all that builds it) takes that dtype's bytes; their gradients are still summed in the
    stored dtype and regrouped back in it, so loss and gradients are bit-equal to regrouping the stored leaves.
    `grad_shard_axis` (1f1b; an auto mesh axis, `dp`): the stages' gradient sums of the leaves regrouped by
    all_to_all are kept sharded over it (`grad_shard_dims`), in the tick loop (each unit's gradient is
    reduce-scattered instead of all-reduced: ZeRO-2) and through the regrouping back to the stored layout.
    """
    p, v = s.stages, s.virtual
    store_p, store_b = storage if storage is not None and p > 1 else (None, None)
    sb = _to_stages(stage_buffers, p, v, store_b)
    if s.kind == "gpipe":
        if grad_shard_axis is not None:
            raise ValueError("grad_shard_axis needs the 1f1b schedule: under gpipe autodiff owns the gradients.")
        if regroup_dtypes is not None:
            raise ValueError("regroup_dtypes needs the 1f1b schedule: under gpipe autodiff would sum the "
                             "cast leaves' gradients in the cast dtype.")
        out = _run(s, _GPipeTick, stage_fn, head_fn, _to_stages(stage_params, p, v, store_p), sb, head_params,
                   x, side, head_data)
        loss, aux, head_aux, activity = _outputs(s, out)
        return loss, {**aux, **head_aux, "pipeline/activity": activity}
    casts = jax.tree.map(lambda _: None, stage_params) if regroup_dtypes is None else regroup_dtypes
    cast = lambda t: jax.tree.map(lambda d, a: a if d is None else a.astype(d), casts, t,  # noqa: E731
                                  is_leaf=lambda x: x is None)
    stored_dtypes = jax.tree.map(lambda a: a.dtype, stage_params)

    @jax.custom_vjp
    def run(params, hp, x, sb, side, hdata):  # not differentiated: the same loop, gradients dropped
        return fwd(params, hp, x, sb, side, hdata)[0]

    dims = grad_shard_dims(stage_params, store_p, grad_shard_axis)

    def stage_grad_spec(spec: P | None, d: int | None) -> P | None:
        return None if d is None else P(None, None, *_stage_rest(tuple(spec)[1:], d, grad_shard_axis))

    def unit_grad_spec(spec: P | None, d: int | None) -> P | None:
        return None if d is None else P(None, *_stage_rest(tuple(spec)[1:]))

    specs_p = jax.tree.map(lambda _: None, stage_params) if store_p is None else store_p
    grad_specs = jax.tree.map(stage_grad_spec, specs_p, dims, is_leaf=lambda x: x is None)
    unit_specs = jax.tree.map(unit_grad_spec, specs_p, dims, is_leaf=lambda x: x is None)

    def fwd(params, hp, x, sb, side, hdata):
        tick = functools.partial(_OneFOneBTick, offload=offload, grad_dtypes=stored_dtypes, grad_specs=grad_specs,
                                 unit_specs=unit_specs)
        out = _run(s, tick, stage_fn, head_fn, _to_stages(cast(params), p, v, store_p), sb, hp, x, side, hdata)
        # the gradient sums (stored dtype, stage layout) back to the stored layout: the regrouping's transpose
        stage_grads = _grads_from_stages(out["grad"], params, p, v, store_p, dims, grad_shard_axis)
        grads = (stage_grads, jax.tree.map(lambda a: a[p - 1], out["head_grad"]), out["dx"][0])
        return _outputs(s, out), grads

    def bwd(grads, cts):
        ct = cts[0]
        scale = lambda tree: jax.tree.map(lambda g: (g * ct).astype(g.dtype), tree)  # noqa: E731
        return (*(scale(g) for g in grads), None, None, None)

    run.defvjp(fwd, bwd)
    loss, aux, head_aux, activity = run(stage_params, head_params, x, sb, side, head_data)
    return loss, {**aux, **head_aux, "pipeline/activity": activity}
