"""Pipeline bubble and expert all-to-all volume of a pipelined, expert-parallel tiny K2 on fake CPU devices.

Default: p=4 stages, v=2 virtual stages, m=8 microbatches, schedule 1f1b, mesh (pp, dp, ep) = (4, 1, 2) on 8
fake devices; a K2 with 1 dense + 8 MoE layers (one per chunk), batch 16 x 32. The loss and gradients are
computed by the real pipelined loss (k25/train/pipelined_lm.py), and its tick loop returns the op every
stage ran at every tick, so

    bubble_fraction = idle (stage, tick) pairs / all pairs        (measured from the executed loop)
    bubble_theory   = (p - 1) / (v*m + p - 1)
    bubble_excess   = bubble_fraction - bubble_theory             (target <= 0.05)

Ticks are unit-time for forward and backward units alike, the assumption of the theoretical figure. The
gpipe schedule's forward loop is measured the same way (its autodiff backward replays those ticks).

`a2a_bytes_per_step`: bytes the expert all-to-alls put on the interconnect per step, summed over devices,
from `k25.parallel.expert.a2a_bytes_per_step` (every MoE layer runs on exactly one pipeline stage, and
each token passes it once forward and once backward). Cross-check: the float all-to-alls in the lowered
HLO of the same model's unpipelined EP loss+gradient (pp=1, same dp/ep; its MoE layers sit in one scanned
body, so each op runs once per layer), counted as tests/parallel/test_expert.py does, must give the same
number (`a2a_hlo_bytes_per_step`). Also reported: median seconds of one jitted loss+gradient per schedule
and its compiled temporary bytes (1f1b keeps at most ~p*v microbatch units of residuals, gpipe all m*v).
"""

from __future__ import annotations

from experiments.benchmarks._devices import emulate_cpu_devices

emulate_cpu_devices(8)

import argparse
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.benchmarks._timing import machine, median_seconds
from k25.model.config import tiny
from k25.model.decoder import K2Model
from k25.parallel import schedule as sched
from k25.parallel.expert import a2a_bytes_per_step
from k25.parallel.mesh import batch_sharding, make_mesh, state_shardings
from k25.train.pipelined_lm import PipelineSettings, pipelined_decoder_loss
from k25.train.pretrain import lm_loss, token_loss_sum
from k25.train.state import split_model


def _batch(b: int, s: int, vocab: int) -> dict[str, jax.Array]:
    ids = jax.random.randint(jax.random.key(1), (b, s + 1), 0, vocab)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "positions": pos,
            "segment_ids": jnp.ones((b, s), jnp.int32), "loss_mask": jnp.ones((b, s), jnp.int32)}


def _placed(model: nnx.Module, batch: dict, mesh) -> tuple[Any, Any, Any, Any]:
    """(model_def, params, buffers, batch) laid out as training lays them out on `mesh`."""
    model_def, params, buffers = split_model(model)
    _, p_state, b_state = nnx.split(model, nnx.Param, ...)
    return (model_def, jax.device_put(params, state_shardings(p_state, mesh)),
            jax.device_put(buffers, state_shardings(b_state, mesh)),
            jax.device_put(batch, batch_sharding(mesh)))


def _value_and_grad(model_def, loss_fn):
    def f(params, buffers, batch):
        return jax.value_and_grad(lambda p: loss_fn(model_def.merge(p, buffers), batch), has_aux=True)(params)
    return jax.jit(f)


def _hlo_a2a_bytes(text: str, n_dev: int, ep: int, layers: int) -> int:
    """Off-device bytes of the float all-to-alls in lowered StableHLO whose MoE layers are one scanned body."""
    per_device = 0
    for dims in re.findall(r"stablehlo\.all_to_all.*?-> tensor<([0-9x]+)xf32>", text):
        per_device += int(np.prod([int(d) for d in dims.split("x")])) * 4
    return per_device * n_dev * (ep - 1) // ep * layers


def run(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser("pipeline")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--virtual", type=int, default=2)
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--ep", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    p, v, m, ep = a.stages, a.virtual, a.microbatches, a.ep
    n_dev = len(jax.devices())
    if n_dev % (p * ep):
        raise SystemExit(f"{n_dev} devices do not hold pp={p} x ep={ep}; set XLA_FLAGS="
                         "--xla_force_host_platform_device_count before jax is imported.")
    dp = n_dev // (p * ep)
    cfg = tiny(num_hidden_layers=1 + p * v, hidden_size=64, grouped_gemm="blocked", moe_block_size=8)
    model = K2Model(cfg, rngs=nnx.Rngs(0))
    batch = _batch(m * dp * ep, a.seq, cfg.vocab_size)
    tokens = batch["input_ids"].size
    out: dict[str, Any] = {"machine": machine(), "stages": p, "virtual_stages": v, "microbatches": m,
                           "mesh": {"pp": p, "dp": dp, "ep": ep}, "batch": list(batch["input_ids"].shape),
                           "moe_layers": cfg.num_moe_layers}

    mesh = make_mesh({"pp": p, "dp": dp, "ep": ep})
    model_def, params, buffers, placed = _placed(model, batch, mesh)
    for kind in sched.SCHEDULES:
        settings = PipelineSettings(stages=p, virtual=v, microbatches=m, schedule=kind)
        fn = _value_and_grad(model_def, lambda mod, b, s=settings: pipelined_decoder_loss(
            mod, b, s, token_loss_sum, with_activity=True))
        with jax.set_mesh(mesh):
            compiled = fn.lower(params, buffers, placed).compile()
            (loss, aux), _ = compiled(params, buffers, placed)
            seconds = median_seconds(compiled, params, buffers, placed, repeats=a.repeats)
        activity = np.asarray(aux["pipeline/activity"])
        out[kind] = {"ticks": int(activity.shape[1]), "bubble_fraction": float(np.mean(activity == sched.IDLE)),
                     "loss": float(loss), "fwd_bwd_s": seconds,
                     "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}
    theory = sched.bubble_theory(p, v, m)
    out.update(schedule="1f1b", bubble_fraction=out["1f1b"]["bubble_fraction"], bubble_theory=theory,
               bubble_excess=out["1f1b"]["bubble_fraction"] - theory, target_bubble_excess=0.05)

    out["a2a_bytes_per_step"] = a2a_bytes_per_step(cfg, tokens, ep, 4)
    flat = make_mesh({"pp": 1, "dp": n_dev // ep, "ep": ep})
    model_def, params, buffers, placed = _placed(model, batch, flat)
    with jax.set_mesh(flat):
        text = _value_and_grad(model_def, lm_loss).lower(params, buffers, placed).as_text()
    out["a2a_hlo_bytes_per_step"] = _hlo_a2a_bytes(text, n_dev, ep, cfg.num_moe_layers)
    return out
