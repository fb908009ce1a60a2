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

Why a static worst-case buffer (C = t * min(k, E_loc) rows per rank pair) rather than
`jax.lax.ragged_all_to_all`: XLA:CPU in jax 0.10.2 rejects ragged-all-to-all ("HLO opcode
`ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"), and the tests run on CPU. The bound
never overflows because a token's top-k experts are distinct, so it sends at most
min(k, E_loc) rows to one rank; nothing is ever dropped. The cost is ep * min(k, E_loc) / k times the
wire bytes and expert-GEMM rows of a ragged exchange (see `a2a_bytes_per_step`).

The path is chosen by the *ambient* mesh: trace the model under `with jax.set_mesh(mesh):`. In jax 0.10
the legacy `with mesh:` (deprecated) does not set `jax.sharding.get_abstract_mesh()`, so it leaves the
single-device path in place. Enter it around the jitted call, not around model construction: flax 0.12
NNX constructors under an ambient mesh read the logical axis names ("layers", ...) as mesh axes and fail.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from k25.model.config import K2Config
from k25.model.grouped_gemm import grouped_swiglu
from k25.parallel.mesh import BATCH_AXES

EP = "ep"


def ambient_ep(mesh: Mesh | AbstractMesh | None = None) -> int:
    """Size of the `ep` axis of `mesh` (default: the mesh set by `jax.set_mesh`), 1 when there is none."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty or EP not in mesh.axis_names:
        return 1
    return int(mesh.shape[EP])


def _capacity(tokens: int, k: int, experts_per_rank: int) -> int:
    """Rows one rank can send to one other rank: each token's k experts are distinct."""
    return tokens * min(k, experts_per_rank)


def _ep_body(x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, valid: jnp.ndarray, w_gate: jnp.ndarray,
             w_up: jnp.ndarray, w_down: jnp.ndarray, *, impl: str, block: int, batch_axes: tuple[str, ...]
             ) -> tuple[jnp.ndarray, jnp.ndarray]:
    """One rank: its t tokens x (t, D), routing (t, k), its E_loc experts -> (out (t, D), global counts (E,))."""
    t, k = idx.shape
    d = x.shape[-1]
    e_loc = w_gate.shape[0]
    ep = jax.lax.axis_size(EP)
    cap = _capacity(t, k, e_loc)

    # 1-2. sort by expert (= by destination rank), exchange how many rows go to each (rank, local expert)
    flat = idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    token = order // k
    dest = flat[order] // e_loc
    send_counts = jnp.bincount(flat, length=ep * e_loc).astype(jnp.int32).reshape(ep, e_loc)
    recv_counts = jax.lax.all_to_all(send_counts, EP, 0, 0)  # [i, e]: rows from rank i for my expert e
    sent = send_counts.sum(1)
    pos = jnp.arange(t * k) - (jnp.cumsum(sent) - sent)[dest]  # slot inside the chunk for `dest`

    # 3. dispatch (scatter-add onto zeros: the slots are distinct, and add is linear for autodiff)
    send = jnp.zeros((ep, cap, d), x.dtype).at[dest, pos].add(x[token])
    recv = jax.lax.all_to_all(send, EP, 0, 0).reshape(ep * cap, d)

    # 4. chunk i holds rank i's rows sorted by expert, then padding: order all rows by local expert
    def expert_of_slot(c: jnp.ndarray) -> jnp.ndarray:
        return jnp.repeat(jnp.arange(e_loc + 1), jnp.append(c, cap - c.sum()), total_repeat_length=cap)

    perm = jnp.argsort(jax.vmap(expert_of_slot)(recv_counts).reshape(-1), stable=True)
    inv = jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))
    y = grouped_swiglu(recv[perm], recv_counts.sum(0), w_gate, w_up, w_down, impl, block)

    # 5. combine: back to the sending slots, weight, add onto the tokens
    back = jax.lax.all_to_all(y[inv].reshape(ep, cap, d), EP, 0, 0)
    y_tok = back[dest, pos] * weights.reshape(-1)[order][:, None].astype(back.dtype)
    out = jnp.zeros_like(x).at[token].add(y_tok)
    counts = jnp.zeros((ep * e_loc,), jnp.float32).at[flat].add(jnp.repeat(valid.astype(jnp.float32), k))
    return out, jax.lax.psum(counts, batch_axes)


def expert_parallel_moe(x: jnp.ndarray, weights: jnp.ndarray, idx: jnp.ndarray, w_gate: jnp.ndarray,
                        w_up: jnp.ndarray, w_down: jnp.ndarray, impl: str = "auto", block: int = 128,
                        mesh: Mesh | AbstractMesh | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Routed-expert output for x (T, D) with top-k (weights, idx) (T, k), experts sharded over `ep`.

    Same result as `dispatch_compute_combine` plus the global per-expert assignment counts (E,).
    `mesh` defaults to the ambient one (`jax.set_mesh`). T need not divide by dp*ep: the tail is padded
    with zero-weight tokens that are not counted.
    """
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
    if pad:  # padding tokens pick k distinct experts (keeping the capacity bound) with weight 0
        x = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)])
        weights = jnp.concatenate([weights, jnp.zeros((pad, k), weights.dtype)])
        idx = jnp.concatenate([idx, jnp.broadcast_to(jnp.arange(k, dtype=idx.dtype), (pad, k))])
        valid = jnp.concatenate([valid, jnp.zeros((pad,), bool)])
    tok, exp = P(batch_axes), P(EP)

    def body(*args: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        return _ep_body(*args, impl=impl, block=block, batch_axes=batch_axes)

    out, counts = jax.shard_map(body, mesh=mesh, in_specs=(tok, tok, tok, tok, exp, exp, exp),
                                out_specs=(tok, P()))(x, weights, idx, valid, w_gate, w_up, w_down)
    return out[:n], counts


def a2a_bytes_per_step(cfg: K2Config, tokens_per_step: int, ep: int, dtype_bytes: int) -> int:
    """Bytes the expert all-to-alls put on the interconnect in one training step, summed over devices.

    Per MoE layer and per all-to-all, each (dp, ep) rank with t = tokens/(dp*ep) tokens exchanges an
    (ep, C, D) buffer, C = t*min(k, E/ep), of which the (ep-1)/ep not addressed to itself leaves the
    device: tokens * (ep-1) * min(k, E/ep) * D * dtype_bytes in all, whatever dp is. A step runs four:
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
    per_a2a = tokens_per_step * (ep - 1) * min(cfg.num_experts_per_tok, e_loc) * cfg.hidden_size * dtype_bytes
    return cfg.num_moe_layers * (6 if replayed else 4) * per_a2a
