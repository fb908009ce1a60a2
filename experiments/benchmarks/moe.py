"""Dropless grouped-GEMM expert layer vs one-hot dense dispatch (every expert on every token, masked).

Default shape from the issue: E=64, top-8, 4096 tokens, hidden 512, expert width 256, float32.
`speedup_vs_dense` uses the implementation `grouped_gemm="auto"` picks on this backend and
times forward+backward (a training step's work); forward-only and the other implementation are
reported alongside.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments.benchmarks._timing import machine, median_seconds
from k25.model.grouped_gemm import resolve_impl
from k25.model.moe import dispatch_compute_combine


def dense_dispatch(x, weights, idx, w_gate, w_up, w_down):
    """Same math, all experts for all tokens, combined through a one-hot (T, E) weight matrix."""
    t, e = x.shape[0], w_gate.shape[0]
    combine = jnp.zeros((t, e), x.dtype).at[jnp.arange(t)[:, None], idx].add(weights)
    h = jnp.einsum("td,edf->etf", x, w_gate)
    u = jnp.einsum("td,edf->etf", x, w_up)
    y = jnp.einsum("etf,efd->etd", jax.nn.silu(h) * u, w_down)
    return jnp.einsum("etd,te->td", y, combine)


def run(argv: list[str]) -> dict:
    p = argparse.ArgumentParser("moe")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--skip_ragged_on_cpu", action="store_true", help="skip the slow ragged_dot timing on CPU")
    a = p.parse_args(argv)
    k = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(k[0], (a.tokens, a.hidden), jnp.float32)
    wg = jax.random.normal(k[1], (a.experts, a.hidden, a.width)) * a.hidden**-0.5
    wu = jax.random.normal(k[2], (a.experts, a.hidden, a.width)) * a.hidden**-0.5
    wd = jax.random.normal(k[3], (a.experts, a.width, a.hidden)) * a.width**-0.5
    scores = jax.nn.sigmoid(jax.random.normal(k[4], (a.tokens, a.experts)))
    weights, idx = jax.lax.top_k(scores, a.topk)
    args = (x, weights, idx, wg, wu, wd)

    def timed(fn):
        fwd = jax.jit(fn)
        bwd = jax.jit(jax.grad(lambda x, w, i, g, u, d: jnp.sum(fn(x, w, i, g, u, d) ** 2), argnums=(0, 1, 3, 4, 5)))
        return median_seconds(fwd, *args, repeats=a.repeats), median_seconds(bwd, *args, repeats=a.repeats)

    auto = resolve_impl("auto")
    out = {"machine": machine(), "shape": vars(a), "grouped_gemm_auto": auto}
    dense_f, dense_b = timed(dense_dispatch)
    out.update(dense_fwd_s=dense_f, dense_fwd_bwd_s=dense_b)
    for impl in ("blocked", "ragged_dot"):
        if impl == "ragged_dot" and a.skip_ragged_on_cpu and jax.default_backend() == "cpu":
            continue
        f, b = timed(lambda *z, impl=impl: dispatch_compute_combine(*z, impl=impl))
        out.update({f"{impl}_fwd_s": f, f"{impl}_fwd_bwd_s": b, f"{impl}_speedup_vs_dense": dense_b / b,
                    f"{impl}_fwd_speedup_vs_dense": dense_f / f})
    err = jnp.abs(jax.jit(dispatch_compute_combine)(*args) - jax.jit(dense_dispatch)(*args)).max()
    out["max_abs_diff_vs_dense"] = float(err)
    out["speedup_vs_dense"] = out[f"{auto}_speedup_vs_dense"]
    out["target_speedup_vs_dense"] = 3.0
    return out
