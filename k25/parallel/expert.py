"""Expert parallelism: routed experts sharded over the `ep` mesh axis, tokens moved to them by all-to-all.

Layout (k25/parallel/mesh.py): the batch is split over ("dp", "ep"), so every (dp, ep) rank holds its own
t tokens; the expert weights' `exp` axis maps to `ep`, so ep rank r holds experts [r*E_loc, (r+1)*E_loc)
(E_loc = E/ep), replicated over dp and pp. `expert_parallel_moe` replaces `dispatch_compute_combine` with
a `jax.shard_map`, manual over every mesh axis, whose per-rank body is:

  1. sort the local (token, slot) assignments by expert, which also groups them by destination rank;
  2. exchange the per-(rank, local expert) counts with one small int32 `all_to_all`;
  3. dispatch: scatter the rows into a static (ep, C, D) send buffer, chunk j for rank j, and `all_to_all`;
  4. the receiver orders the rows it got by local expert and runs `grouped_swiglu` over its E_loc experts;
  5. combine: the reverse `all_to_all` brings every output back to the slot it left from; the sender
     weights it and scatter-adds it onto its token, exactly as the single-device path does.
Routing itself stays outside (per token, router replicated), so tokens never leave their rank except as
expert inputs. Gradients need nothing extra: `all_to_all` transposes to the reverse `all_to_all`,
shard_map's transpose psums the expert-weight gradients over dp and pp (where they are replicated), and
the router's gradient reaches it through the routing weights, an ordinary sharded input.

Two exchanges, chosen by `K2Config.ep_exchange`:

- `"all_to_all"` (the default): a static (ep, C, D) send buffer per rank, one chunk per destination. By
  default C is the worst case t * min(k, E_loc) rows per rank pair: it never overflows because a token's
  top-k experts are distinct, so it sends at most min(k, E_loc) rows to one rank; nothing is ever dropped.
  The cost is ep * min(k, E_loc) / k times the wire bytes and expert-GEMM rows of a ragged exchange (16x for
  K2 at ep=16; see `a2a_bytes_per_step`). `K2Config.ep_capacity_factor` c > 0 bounds it instead to
  C = ceil(c * t * k / ep) rows (c times a pair's average, rounded up to a multiple of 8, at most the worst
  case). A pair's rows past C, the last ones in the (expert, stable) send order, are then dropped: not sent,
  not in the receiver's group sizes, zero in the combine.
- `"ragged"`: `jax.lax.ragged_all_to_all`. The send buffer is the t*k sorted assignment rows themselves and
  only the routed rows cross the wire. The receive buffer still needs a static size R: the dropless worst
  case ep * t * min(k, E_loc) (every sender's rows for this rank), or with c > 0 R = ceil(c * t * k) rounded
  up to a multiple of 8 (c times a rank's average). A receiver hands R out first come, in sender order; a
  sender's rows past its share, the last in its (expert, stable) order, are dropped. So the drop bound is
  per receiver, not per pair, and the send side holds t*k rows instead of ep*C. XLA:CPU in jax 0.10.2
  rejects the primitive ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"): it
  lowers there (plans without `--compile`), and `check_exchange_backend` stops a CPU run before the compile
  with an error naming the field.

The load-balancing counts always count every routed assignment (the bias balances routing, not what
survived); the number dropped is returned beside them.

The path is chosen by the *ambient* mesh: trace the model under `with jax.set_mesh(mesh):`. In jax 0.10
the legacy `with mesh:` (deprecated) does not set `jax.sharding.get_abstract_mesh()`, so it leaves the
single-device path in place. Enter it around the jitted call, not around model construction: flax 0.12
NNX constructors under an ambient mesh read the logical axis names ("layers", ...) as mesh axes and fail.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from k25.model.config import EP_EXCHANGES, K2Config
from k25.model.grouped_gemm import grouped_swiglu
from k25.parallel.collectives import all_to_all_bits
from k25.parallel.mesh import BATCH_AXES

EP = "ep"


def ambient_ep(mesh: Mesh | AbstractMesh | None = None) -> int:
    """Size of the `ep` axis of `mesh` (default: the mesh set by `jax.set_mesh`), 1 when there is none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or EP not in mesh.axis_names:
        return 1
    return int(mesh.shape[EP])


def ep_capacity(tokens: int, k: int, experts_per_rank: int, ep: int, factor: float = 0.0) -> int:
    """Rows of the send buffer per (sender, receiver) pair for `tokens` tokens on the sender.

    The worst case t*min(k, E_loc) (each token's k experts are distinct) when factor is 0, else
    ceil(factor*t*k/ep) rounded up to a multiple of 8 (sublane-aligned buffers), capped at the worst case.
    """
    worst = tokens * min(k, experts_per_rank)
    if factor <= 0:
        return worst
    rows = math.ceil(factor * tokens * k / ep)
    return min(-(-rows // 8) * 8, worst)


def ragged_receive_rows(tokens: int, k: int, experts_per_rank: int, ep: int, factor: float = 0.0) -> int:
    """Rows of one rank's receive buffer in the ragged exchange, `tokens` tokens per sender.

    The worst case ep*t*min(k, E_loc) (every sender's most rows for this rank) when factor is 0, else
    ceil(factor*t*k) rounded up to a multiple of 8, capped at the worst case.
    """
    worst = ep * tokens * min(k, experts_per_rank)
    if factor <= 0:
        return worst
    return min(-(-math.ceil(factor * tokens * k) // 8) * 8, worst)


def check_exchange_backend(cfg: K2Config, ep: int) -> None:
    """Stop before XLA does: a ragged exchange cannot be compiled by XLA:CPU (jax 0.10.2)."""
    if ep > 1 and cfg.num_moe_layers and cfg.ep_exchange == "ragged" and jax.default_backend() == "cpu":
        raise ValueError(
            "model.ep_exchange='ragged': XLA:CPU cannot compile jax.lax.ragged_all_to_all (HLO opcode "
            "`ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter). Use model.ep_exchange='all_to_all' "
            "on CPU (with model.ep_capacity_factor to bound its buffers), or run on GPU/TPU; `--dry_run` "
            "without `--compile` still lowers the ragged plan.")


@jax.custom_vjp
def _move_rows(a: jnp.ndarray, idx: jnp.ndarray, inv: jnp.ndarray) -> jnp.ndarray:
    """a[idx] with zero rows where idx is out of range, for an idx that reads every row of `a` at most once;
    `inv` is that map's inverse (for each row of `a`, the output row that reads it, out of range if none).
    The backward is then the gather ct[inv] instead of autodiff's scatter-add into zeros (which XLA:CPU
    widens to f32 for bf16 rows: the K2 plan's largest f32 temporaries in a backward unit); exact either
    way, since every row receives at most one term."""
    return a.at[idx].get(mode="fill", fill_value=0)


def _move_rows_fwd(a, idx, inv):
    return _move_rows(a, idx, inv), (idx, inv)


def _move_rows_bwd(res, ct):
    idx, inv = res
    return ct.at[inv].get(mode="fill", fill_value=0), None, None


_move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def _sorted_assignments(idx: jnp.ndarray, valid: jnp.ndarray, n_exp: int, e_loc: int, ep: int) -> tuple[
        jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """A rank's (token, slot) assignments sorted by expert, which also groups them by destination rank.
    Padding tokens get key E: they sort last and are never sent. Returns (flat expert ids, real mask,
    sort key, order, token of each sorted row, destination rank of each sorted row)."""
    k = idx.shape[1]
    flat = idx.reshape(-1)
    real = jnp.repeat(valid, k)
    key = jnp.where(real, flat, n_exp)
    order = jnp.argsort(key, stable=True)
    return flat, real, key, order, order // k, jnp.minimum(key[order] // e_loc, ep - 1)


def _combine(x: jnp.ndarray, y_sorted: jnp.ndarray, weights: jnp.ndarray, flat: jnp.ndarray, real: jnp.ndarray,
             order: jnp.ndarray, token: jnp.ndarray, keep: jnp.ndarray, n_exp: int, batch_axes: tuple[str, ...]
             ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Weight the expert outputs of the sorted rows (0 where dropped), add them onto their tokens; with the
    global per-expert counts of every routed assignment and the global dropped count."""
    y_tok = y_sorted * weights.reshape(-1)[order][:, None].astype(y_sorted.dtype)
    out = jnp.zeros_like(x).at[token].add(y_tok)
    counts = jnp.zeros((n_exp,), jnp.float32).at[flat].add(real.astype(jnp.float32))
    dropped = jnp.sum(real[order] & ~keep, dtype=jnp.int32)
    return out, jax.lax.psum(counts, batch_axes), jax.lax.psum(dropped, batch_axes)


def _ep_body(x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, valid: jnp.ndarray, w_gate: jnp.ndarray,
             w_up: jnp.ndarray, w_down: jnp.ndarray, *, impl: str, block: int, capacity_factor: float,
             batch_axes: tuple[str, ...]) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """One rank: its t tokens x (t, D), routing (t, k), its E_loc experts.

    Returns (out (t, D), global per-expert counts (E,) of all routed assignments, global dropped count).
    """
    t, k = idx.shape
    d = x.shape[-1]
    e_loc = w_gate.shape[0]
    ep = jax.lax.axis_size(EP)
    n_exp = ep * e_loc
    cap = ep_capacity(t, k, e_loc, ep, capacity_factor)

    # 1-2. sort by expert (= by destination rank)
    flat, real, key, order, token, dest = _sorted_assignments(idx, valid, n_exp, e_loc, ep)
    expert = key[order]
    routed = jnp.bincount(key, length=n_exp).reshape(ep, e_loc).sum(1)  # excludes the padding key
    pos = jnp.arange(t * k) - (jnp.cumsum(routed) - routed)[dest]  # slot inside the chunk for `dest`
    keep = real[order] & (pos < cap)  # a pair's rows past its capacity are dropped
    slot = jnp.where(keep, pos, cap)  # out of range: the scatter drops it, the gather fills 0
    # exchange how many rows each (rank, local expert) gets, counting only the rows actually sent
    send_counts = jnp.zeros((n_exp,), jnp.int32).at[expert].add(keep.astype(jnp.int32), mode="drop")
    recv_counts = jax.lax.all_to_all(send_counts.reshape(ep, e_loc), EP, 0, 0)  # [i, e]: from rank i, expert e

    # 3. dispatch (scatter-add onto zeros: the slots are distinct, and add is linear for autodiff)
    send = jnp.zeros((ep, cap, d), x.dtype).at[dest, slot].add(x[token], mode="drop")
    recv = all_to_all_bits(send, EP, 0, 0).reshape(ep * cap, d)

    # 4. chunk i holds rank i's rows sorted by expert, then padding: order all rows by local expert
    def expert_of_slot(c: jnp.ndarray) -> jnp.ndarray:
        return jnp.repeat(jnp.arange(e_loc + 1), jnp.append(c, cap - c.sum()), total_repeat_length=cap)

    perm = jnp.argsort(jax.vmap(expert_of_slot)(recv_counts).reshape(-1), stable=True)
    inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
    y = grouped_swiglu(_move_rows(recv, perm, inv), recv_counts.sum(0), w_gate, w_up, w_down, impl, block)

    # 5. combine: back to the sending slots, weight, add onto the tokens
    back = all_to_all_bits(_move_rows(y, inv, perm).reshape(ep, cap, d), EP, 0, 0)
    sent = jnp.where(keep, dest * cap + slot, ep * cap)  # each kept assignment's send row; dropped: none
    sender = jnp.full((ep * cap,), t * k, jnp.int32).at[sent].set(jnp.arange(t * k, dtype=jnp.int32), mode="drop")
    y_back = _move_rows(back.reshape(ep * cap, d), sent, sender)  # dropped rows: 0
    return _combine(x, y_back, weights, flat, real, order, token, keep, n_exp, batch_axes)


def _zeros_varying_as(ref: jnp.ndarray, rows: int) -> jnp.ndarray:
    """Zero rows shaped like `ref`'s and, inside shard_map, varying over the same mesh axes:
    `ragged_all_to_all`'s result takes its `output` operand's type, and a replicated zero buffer would not
    match the rows written into it (`zeros_like` keeps the type, `zeros` does not)."""
    return jnp.zeros_like(ref, shape=(rows, *ref.shape[1:]))


def _ep_body_ragged(x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, valid: jnp.ndarray,
                    w_gate: jnp.ndarray, w_up: jnp.ndarray, w_down: jnp.ndarray, *, impl: str, block: int,
                    capacity_factor: float, batch_axes: tuple[str, ...], ragged_a2a: Callable[..., jnp.ndarray]
                    ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`_ep_body` with `ragged_all_to_all`: only routed rows move, into a receive buffer of R rows.

    Offsets are agreed in two small int32 exchanges: senders tell receivers their rows per local expert and
    where their chunk starts; receivers hand out R first come in sender order and answer (rows accepted,
    where they go). The combine is the same ragged exchange backwards, into each row's sorted slot.
    """
    t, k = idx.shape
    e_loc = w_gate.shape[0]
    ep = jax.lax.axis_size(EP)
    n_exp = ep * e_loc
    rows = ragged_receive_rows(t, k, e_loc, ep, capacity_factor)

    flat, real, key, order, token, dest = _sorted_assignments(idx, valid, n_exp, e_loc, ep)
    per_expert = jnp.bincount(key, length=n_exp).reshape(ep, e_loc).astype(jnp.int32)  # [j, e]: rows for j
    routed = per_expert.sum(1)
    start = jnp.cumsum(routed) - routed  # where dest j's rows start in the sorted list

    # senders -> receivers: rows per local expert and the chunk's start; [i] = from sender i
    got = jax.lax.all_to_all(jnp.concatenate([per_expert, start[:, None]], 1), EP, 0, 0)
    recv_per_expert, start_in = got[:, :e_loc], got[:, e_loc]
    recv_routed = recv_per_expert.sum(1)
    before = jnp.cumsum(recv_routed) - recv_routed
    accept = jnp.clip(rows - before, 0, recv_routed)  # R handed out first come, in sender order
    # empty slices get offset 0, so every offset lies inside its buffer whatever the backend checks
    offset_in = jnp.where(accept > 0, before, 0)
    start_in = jnp.where(accept > 0, start_in, 0)
    # receivers -> senders: [j] = (rows receiver j accepts from me, where they go there)
    answer = jax.lax.all_to_all(jnp.stack([accept, offset_in], 1), EP, 0, 0)
    allowed, offset_out = answer[:, 0], answer[:, 1]
    pos = jnp.arange(t * k) - start[dest]
    keep = real[order] & (pos < allowed[dest])
    start = jnp.where(allowed > 0, start, 0)

    recv = ragged_a2a(x[token], _zeros_varying_as(x, rows), start, allowed, offset_out, accept, axis_name=EP)

    # the buffer holds sender 0's accepted rows by expert, then sender 1's, ..., then padding
    e_before = jnp.cumsum(recv_per_expert, 1) - recv_per_expert
    kept = jnp.clip(accept[:, None] - e_before, 0, recv_per_expert)  # [i, e] rows accepted per expert
    label = jnp.repeat(jnp.append(jnp.tile(jnp.arange(e_loc), ep), e_loc),
                       jnp.append(kept.reshape(-1), rows - kept.sum()), total_repeat_length=rows)
    perm = jnp.argsort(label, stable=True)
    inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(rows, dtype=perm.dtype))
    y = grouped_swiglu(_move_rows(recv, perm, inv), kept.sum(0), w_gate, w_up, w_down, impl, block)

    # combine: each accepted row back to its sorted slot on its sender; rows not sent stay 0
    back = ragged_a2a(_move_rows(y, inv, perm), _zeros_varying_as(y, t * k), offset_in, accept, start_in,
                      allowed, axis_name=EP)
    return _combine(x, back, weights, flat, real, order, token, keep, n_exp, batch_axes)


def expert_parallel_moe(x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, w_gate: jnp.ndarray,
                        w_up: jnp.ndarray, w_down: jnp.ndarray, impl: str = "auto", block: int = 128,
                        capacity_factor: float = 0.0, mesh: Mesh | AbstractMesh | None = None,
                        exchange: str = "all_to_all", ragged_a2a: Callable[..., jnp.ndarray] | None = None
                        ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Routed-expert output for x (T, D) with top-k (weights, idx) (T, k), experts sharded over `ep`.

    Returns (out (T, D), global per-expert counts (E,) of every routed assignment, int32 number of
    assignments dropped for capacity). With capacity_factor 0 nothing drops and `out` is the same as
    `dispatch_compute_combine`'s; with c > 0 see `ep_capacity` and the module docstring.
    `mesh` defaults to the ambient one (`jax.set_mesh`). T need not divide by dp*ep: the tail is padded
    with zero-weight tokens that are neither sent nor counted. `exchange` is `K2Config.ep_exchange`;
    `ragged_a2a` replaces `jax.lax.ragged_all_to_all` (same signature), e.g. by a reference built on
    dense collectives where the backend cannot compile the primitive.
    """
    if capacity_factor < 0:
        raise ValueError(f"ep_capacity_factor={capacity_factor} must be >= 0 (0 = dropless worst-case buffer).")
    if exchange not in EP_EXCHANGES:
        raise ValueError(f"ep_exchange={exchange!r} must be one of {EP_EXCHANGES}.")
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    ep = ambient_ep(mesh)
    n_exp = w_gate.shape[0]
    if n_exp % ep:
        raise ValueError(f"expert parallelism: n_routed_experts={n_exp} is not divisible by mesh.ep={ep}; "
                         "set mesh.ep to a divisor of n_routed_experts.")
    batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    n, k = idx.shape
    valid = jnp.ones((n,), bool)
    pad = -n % shards
    if pad:  # padding tokens: weight 0, marked invalid (the body neither sends nor counts them)
        x = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)])
        weights = jnp.concatenate([weights, jnp.zeros((pad, k), weights.dtype)])
        idx = jnp.concatenate([idx, jnp.broadcast_to(jnp.arange(k, dtype=idx.dtype), (pad, k))])
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    tok, exp = P(batch_axes), P(EP)

    def body(*args: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        if exchange == "ragged":
            return _ep_body_ragged(*args, impl=impl, block=block, capacity_factor=capacity_factor,
                                   batch_axes=batch_axes, ragged_a2a=ragged_a2a or jax.lax.ragged_all_to_all)
        return _ep_body(*args, impl=impl, block=block, capacity_factor=capacity_factor, batch_axes=batch_axes)

    out, counts, dropped = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, tok, exp, exp, exp),
                                         out_specs=(tok, P(), P()))(x, weights, idx, valid, w_gate, w_up, w_down)
    return out[:n], counts, dropped


def a2a_bytes_per_step(cfg: K2Config, tokens_per_step: int, ep: int, dtype_bytes: int,
                       capacity_factor: float | None = None, tokens_per_rank: int | None = None) -> int:
    """Bytes the expert all-to-alls put on the interconnect in one training step, summed over devices.

    Per MoE layer and per all-to-all, each (dp, ep) rank holding t tokens in one MoE call exchanges an
    (ep, C, D) buffer, of which the (ep-1)/ep not addressed to itself leaves the device. Dropless
    (capacity_factor 0), C = t*min(k, E/ep): tokens * (ep-1) * min(k, E/ep) * D * dtype_bytes in all,
    whatever dp is. With capacity_factor c > 0 (default: `cfg.ep_capacity_factor`), C = `ep_capacity`:
    exact when `tokens_per_rank` (t, which depends on dp and the microbatching) is given, otherwise
    C/t = min(c*k/ep, min(k, E/ep)) without the rounding of C to a multiple of 8. With
    `ep_exchange="ragged"` only routed rows move: tokens*k*(ep-1)/ep*D*dtype_bytes per all-to-all when
    routing is balanced (the bias's aim), whatever the capacity (drops only lower it). A step runs four:
    dispatch and combine forward, their transposes backward; `remat="full"` replays the forward two in
    the backward (six). `selective` keeps them, but its host-offload variant (`remat_offload` off CPU)
    saves only matmul outputs, so it replays them too. Assumes tokens divide by dp*ep (no padding) and
    leaves out the int32 count exchange ((ep-1)*E/ep*4 bytes per device and layer). With pp > 1 the
    pipeline (k25/train/pipelined_lm.py) runs each pipelined layer on one stage, so pp does not enter,
    except for the num_moe_layers mod (pp*virtual_stages) layers run before the pipeline on every pp rank.
    """
    if ep <= 1 or cfg.num_moe_layers == 0:
        return 0
    if cfg.n_routed_experts % ep:
        raise ValueError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by mesh.ep={ep}.")
    e_loc = cfg.n_routed_experts // ep
    replayed = cfg.remat == "full" or (cfg.remat == "selective" and cfg.remat_offload
                                        and jax.default_backend() != "cpu")
    k = cfg.num_experts_per_tok
    factor = cfg.ep_capacity_factor if capacity_factor is None else capacity_factor
    row_bytes = (ep - 1) * cfg.hidden_size * dtype_bytes
    if cfg.ep_exchange == "ragged":  # only routed rows move: (ep-1)/ep of them leave, at balanced routing
        per_a2a = tokens_per_step * k * row_bytes // ep
    elif factor <= 0:
        per_a2a = tokens_per_step * min(k, e_loc) * row_bytes
    elif tokens_per_rank:
        per_a2a = tokens_per_step // tokens_per_rank * ep_capacity(tokens_per_rank, k, e_loc, ep, factor) * row_bytes
    else:
        per_a2a = round(tokens_per_step * min(factor * k / ep, min(k, e_loc)) * row_bytes)
    return cfg.num_moe_layers * (6 if replayed else 4) * per_a2a
