"""The training runtime: mesh, state, jitted step, data, checkpoints, metrics, evals, signals.

`train(config, workdir)` runs or resumes a run; `plan(config, workdir)` builds everything
abstractly (no weights allocated) and reports sizes. Stages plug in through `k25.train.stage`.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from k25.model.moe import MoE
from k25.parallel.expert import check_exchange_backend
from k25.parallel.mesh import batch_sharding, make_mesh, replicated, state_shardings
from k25.parallel.zero import zero1_shardings
from k25.train.checkpoint import Checkpointer, config_json
from k25.train.metrics import MetricsWriter
from k25.train.optimizer import build_optimizer
from k25.train.stage import Stage, make_stage
from k25.train.state import ModelDef, TrainState, init_state, split_model
from k25.train.step import make_train_step


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class _StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps (save, then exit cleanly)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def _abstract(stage: Stage, config: ml_collections.ConfigDict):
    """ModelDef and abstract params/buffers/state of the stage's model, nothing allocated."""
    model = nnx.eval_shape(lambda: stage.build_model(nnx.Rngs(config.seed)))
    model_def, params, buffers = split_model(model)
    return model, model_def, params, buffers


def _shardings(model: nnx.Module, mesh, opt_state_abstract, zero1: bool) -> tuple[Any, Any, Any]:
    """Parameter and buffer shardings from their logical axes; optimizer state ZeRO-1 sharded or replicated."""
    _, p, b = nnx.split(model, nnx.Param, ...)
    ps, bs = state_shardings(p, mesh), state_shardings(b, mesh)
    if zero1:
        return ps, bs, zero1_shardings(opt_state_abstract, ps, mesh)
    return ps, bs, jax.tree.map(lambda x: replicated(mesh), opt_state_abstract)


class Trainer:
    """Holds everything one run needs; `train()` and `plan()` below are the entry points."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config, self.workdir = config, workdir
        self.stage = make_stage(config)
        self.mesh = make_mesh(config.mesh)
        model, self.model_def, params, buffers = _abstract(self.stage, config)
        self._moe_configs = [m.cfg for _, m in nnx.iter_modules(model) if isinstance(m, MoE)]
        self.optimizer, self.schedule = build_optimizer(config.optim, params, config.total_steps)
        opt_abstract = jax.eval_shape(self.optimizer.init, params)
        ps, bs, os_ = _shardings(model, self.mesh, opt_abstract, config.get("zero1", True))
        rep = replicated(self.mesh)
        self.state_sharding = TrainState(step=rep, params=ps, buffers=bs, opt_state=os_, nonfinite_streak=rep,
                                         nonfinite_total=rep)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, buffers=buffers,
                       opt_state=opt_abstract, nonfinite_streak=jax.ShapeDtypeStruct((), jnp.int32),
                       nonfinite_total=jax.ShapeDtypeStruct((), jnp.int32)),
            self.state_sharding)
        self.batch_sharding = batch_sharding(self.mesh)
        step_fn = make_train_step(self.model_def, self.stage.loss_fn, self.optimizer, self.schedule,
                                  self.stage.step_config())
        self._step = jax.jit(step_fn, in_shardings=(self.state_sharding, self.batch_sharding),
                             out_shardings=(self.state_sharding, rep), donate_argnums=(0,))

    def check_backend(self) -> None:
        """Config errors that only the backend reveals, raised before XLA compiles anything."""
        for cfg in self._moe_configs:
            check_exchange_backend(cfg, int(self.mesh.shape.get("ep", 1)))

    def step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One jitted training step. Runs under `jax.set_mesh` so the MoE takes the expert-parallel path
        (k25/parallel/expert.py) when `mesh.ep > 1`; model construction stays outside (see that module)."""
        with jax.set_mesh(self.mesh):
            return self._step(state, batch)

    def lower_step(self, state: Any, batch: dict) -> Any:
        """`jax.jit(...).lower` of the step on abstract inputs, under the mesh like `step`."""
        with jax.set_mesh(self.mesh):
            return self._step.lower(state, batch)

    def init_state(self) -> TrainState:
        def init():
            _, params, buffers = split_model(self.stage.build_model(nnx.Rngs(self.config.seed)))
            return init_state(params, buffers, self.optimizer)

        return jax.jit(init, out_shardings=self.state_sharding)()

    def model(self, state: TrainState) -> nnx.Module:
        return self.model_def.merge(state.params, state.buffers)

    def global_batch(self, host_batch: dict) -> dict:
        """Device arrays of one global batch from what this process read (see `data_iterator`)."""
        if self.config.get("host_data", "slice") == "replicate":
            return {k: jax.make_array_from_callback(np.shape(v), self.batch_sharding, lambda i, v=v: np.asarray(v)[i])
                    for k, v in host_batch.items()}
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in host_batch.items()}

    def data_iterator(self):
        """`host_data="slice"`: each process reads its own share of the records (the scalable default).
        `"replicate"`: every process reads the whole global stream and keeps its rows, so a multi-process
        run sees exactly the batches of a single-process run (used to check them against each other)."""
        if self.config.get("host_data", "slice") == "replicate":
            return self.stage.train_iterator(self.config.seed, 0, 1)
        return self.stage.train_iterator(self.config.seed, jax.process_index(), jax.process_count())


def run_summary(config: ml_collections.ConfigDict, t: Trainer, state: TrainState, workdir: str,
                start: int) -> str:
    """Two lines that say what is about to run: stage, size, steps, batch, layout and where it writes."""
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    mesh = " ".join(f"{k}{v}" for k, v in t.mesh.shape.items())
    resume = f", resuming at step {start}" if start else ""
    return (f"k25 stage={config.get('stage', 'lm')}: {n_params / 1e6:.2f}M params, {config.total_steps} steps{resume}, "
            f"batch {config.batch_size} x {config.seq_len}, mesh {mesh} on {len(t.mesh.devices.flat)} "
            f"{jax.devices()[0].platform} device(s)\n"
            f"  writing {workdir}/: metrics.jsonl, TensorBoard events, checkpoints/, log.txt")


def check_loop_config(config: ml_collections.ConfigDict) -> None:
    """The loop's own counters, checked before anything is built: a ValueError naming the field and the fix."""
    rules = {"total_steps": (0, "the number of optimizer steps (0: none; eval_at_start still evaluates)"),
             "log_every": (1, "steps between metrics records"),
             "eval_every": (0, "steps between evaluations; 0 evaluates only at the end"),
             "checkpoint_every": (0, "steps between checkpoints; 0 saves only at the end or when stopped"),
             "keep_checkpoints": (1, "checkpoints kept on disk"),
             "max_nonfinite_steps": (1, "consecutive non-finite steps tolerated before stopping")}
    for name, (low, what) in rules.items():
        value = config.get(name)
        if not isinstance(value, int) or value < low:
            raise ValueError(f"config.{name}={value!r}: {what}; set --config.{name} to an integer >= {low}.")


def _due(step: int, every: int, last: int) -> bool:
    """`every` > 0: each multiple of it; 0: only at `last` (which every cadence also includes)."""
    return step == last or (every > 0 and step % every == 0)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
          announce: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train (or resume) to `config.total_steps`; `stop_after` ends early after that many steps (tests).
    `announce` receives a short summary of the run before the first step (the CLI prints it)."""
    check_loop_config(config)
    t = Trainer(config, workdir)
    t.check_backend()
    ckpt = Checkpointer(workdir, max_to_keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    data = t.data_iterator()
    start = ckpt.latest_step()
    if start is None:
        state = t.init_state()
        start = 0
    else:
        state, data_state, _ = ckpt.restore(t.abstract_state, start)
        data.set_state(data_state)
        logging.info("resumed from %s at step %d", ckpt.directory, start)
    writer = MetricsWriter(workdir) if jax.process_index() == 0 else None
    if announce is not None and jax.process_index() == 0:
        announce(run_summary(config, t, state, workdir, start))
    if writer is not None:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_json(config))
    tokens_per_step = config.batch_size * config.seq_len
    end = config.total_steps if stop_after is None else min(config.total_steps, start + stop_after)
    bar = tqdm(total=config.total_steps, initial=start, desc="train", dynamic_ncols=True,
               disable=jax.process_index() != 0 or not config.progress_bar)
    last_eval: dict[str, Any] = {}
    step = start
    interval_start, interval_steps = time.perf_counter(), 0

    if start == 0 and config.get("eval_at_start", False) and config.eval_examples:
        baseline = t.stage.evaluate(t.model(state))  # the untrained model, for comparison with the end
        last_eval = {f"{k}@init": v for k, v in baseline.items()}
        if writer is not None:
            writer.write(0, baseline)

    def save(step: int, force: bool = False) -> None:
        ckpt.save(step, state, data.get_state(), {"step": step}, force=force)

    # On-policy stages (RL) generate their batches with the current weights: the iterator sees the state first.
    observe_state = getattr(data, "observe_state", None)
    try:
        with _StopFlag() as stop:
            while step < end:
                if observe_state is not None:
                    observe_state(state, step)
                state, metrics = t.step(state, t.global_batch(next(data)))
                step += 1
                interval_steps += 1
                bar.update(1)
                streak = int(state.nonfinite_streak)
                if streak >= config.max_nonfinite_steps:
                    raise NonFiniteError(
                        f"{streak} consecutive steps had a non-finite loss or gradient (max_nonfinite_steps="
                        f"{config.max_nonfinite_steps}); stopping. The last checkpoint in {ckpt.directory} holds "
                        "the last good state: lower config.optim.lr or check the data.")
                evaluate = bool(config.eval_examples) and _due(step, config.eval_every, config.total_steps)
                if evaluate or _due(step, config.log_every, end):
                    jax.block_until_ready(metrics)
                    elapsed = time.perf_counter() - interval_start
                    metrics = dict(metrics, tokens_per_s=tokens_per_step * interval_steps / elapsed,
                                   step_time_s=elapsed / interval_steps)
                    if hasattr(data, "host_metrics"):  # counters the stage's iterator keeps (and checkpoints)
                        metrics.update(data.host_metrics())
                    interval_start, interval_steps = time.perf_counter(), 0
                    if evaluate:
                        evals = t.stage.evaluate(t.model(state))
                        metrics.update(evals)
                        last_eval = {**{k: v for k, v in last_eval.items() if k.endswith("@init")}, **evals}
                    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                    tok_s=f"{float(metrics['tokens_per_s']):.0f}")
                    if writer is not None:
                        writer.write(step, metrics)
                if _due(step, config.checkpoint_every, config.total_steps):
                    save(step)
                if stop.signum is not None:
                    logging.warning("signal %d: saving a checkpoint at step %d and exiting", stop.signum, step)
                    save(step, force=True)
                    break
            else:
                if step != ckpt.latest_step():
                    save(step, force=True)
    finally:
        bar.close()
        ckpt.close()
        if writer is not None:
            writer.close()
    return {"step": step, "state": state, "eval": last_eval, "trainer": t}


def _offload_accounting(out: dict[str, Any], mesh: Any, mem: Any) -> dict[str, Any]:
    """Device and host bytes when the 1F1B residual slots live in pinned host memory (`model.remat_offload`).

    A backend that places buffers in two memory spaces reports the host share itself (`host_temp_size_in_bytes`).
    XLA:CPU has one: it compiles the moves (`jax.device_put` to `jax.memory.Space.Host` and back) but assigns
    every buffer to the same space. Then the split is accounted from the compiled figure and the traced slots
    (k25.parallel.pipeline.TRACED_SLOTS): the slot buffers are carried through the whole tick loop, which holds
    every forward and backward unit, so they are live at the loop's peak; their per-device share (the slot
    bytes of one stage over its dp*ep devices: every residual carries the microbatch's tokens, split over the
    data ranks) moves to the host, and the unit being parked or read (one unit's residuals each way) stays
    on the device as staging.
    """
    from k25.parallel.pipeline import TRACED_SLOTS

    host = int(getattr(mem, "host_temp_size_in_bytes", 0) or 0)
    acc: dict[str, Any] = {"compiled_peak_bytes_per_device": out["peak_bytes_per_device"]}
    if TRACED_SLOTS:
        ranks = int(np.prod([n for a, n in mesh.shape.items() if a != "pp"]))
        acc["residual_slot_bytes_per_device"] = TRACED_SLOTS["slot_bytes_per_stage"] // ranks
        acc["residual_slots"] = TRACED_SLOTS["slots"]
    if not TRACED_SLOTS.get("offload"):
        acc["host_bytes_per_device"] = host
        return acc
    if host:
        acc.update(host_bytes_per_device=host, memory_accounting="compiled (two memory spaces)")
        return acc
    slots = acc["residual_slot_bytes_per_device"]
    staging = 2 * TRACED_SLOTS["unit_bytes_per_stage"] // ranks
    acc.update(host_bytes_per_device=slots, peak_bytes_per_device=out["peak_bytes_per_device"] - slots + staging,
               memory_accounting=(
                   "XLA:CPU has one memory space: device = compiled peak - residual slots (host) + 2 units of "
                   "staging; assumes the compiled peak lies in the 1F1B tick loop, where the slots are live"))
    return acc


def plan(config: ml_collections.ConfigDict, workdir: str | None = None, compile: bool = False) -> dict[str, Any]:
    """Sizes of the run from abstract shapes only: parameters, optimizer state, per-device bytes."""
    t = Trainer(config, workdir or "")
    st = t.abstract_state

    def per_device_bytes(tree) -> int:
        total = 0
        for x in jax.tree.leaves(tree):
            shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
            total += int(np.prod(shard)) * x.dtype.itemsize
        return total

    out: dict[str, Any] = {
        "devices": len(jax.devices()),
        "mesh": dict(t.mesh.shape),
        "param_bytes_per_device": per_device_bytes(st.params),
        "buffer_bytes_per_device": per_device_bytes(st.buffers),
        "optimizer_bytes_per_device": per_device_bytes(st.opt_state),
    }
    counts = getattr(t.stage, "param_counts", None)
    if counts is not None:
        out.update(counts())
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=t.batch_sharding)
             for k, v in t.stage.batch_spec(config.batch_size).items()}
    lowered = t.lower_step(st, batch)
    out["lowered"] = True
    if compile:
        t.check_backend()
        mem = lowered.compile().memory_analysis()
        if mem is not None:
            out["temp_bytes_per_device"] = int(mem.temp_size_in_bytes)
            out["argument_bytes_per_device"] = int(mem.argument_size_in_bytes)
            out["output_bytes_per_device"] = int(mem.output_size_in_bytes)
            # the state is donated, so outputs reuse the arguments' buffers: arguments + temporaries is the peak
            out["peak_bytes_per_device"] = out["argument_bytes_per_device"] + out["temp_bytes_per_device"]
            out.update(_offload_accounting(out, t.mesh, mem))
    if workdir:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "plan.json"), "w") as f:
            json.dump(out, f, indent=1)
    return out


__all__ = ["train", "plan", "Trainer", "NonFiniteError", "ModelDef"]
