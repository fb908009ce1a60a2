"""One training step over plain pytrees: gradients (with accumulation), optimizer, QK-Clip, balancing.

A stage's loss function has the signature `loss_fn(model, batch) -> (loss_sum, aux)`: the *sum* of
per-token losses and an aux dict with at least `num_tokens`, plus `max_attn_logits` (layers, heads)
and `expert_counts` (moe layers, experts) when the model has attention / MoE. Summing and dividing
once by the total token count makes accumulation over microbatches exactly a bigger batch.

A step whose loss or gradient norm is not finite changes nothing but the skip counters.

Pipelining (mesh.pp > 1 or pipeline.microbatches > 1) lives inside the stage's loss function
(k25/train/pipelined_lm.py), so this step is the same for every layout: `jax.value_and_grad` differentiates
the pieces before the pipeline, and the pipeline supplies its own gradients, by autodiff through its tick
loop (gpipe) or computed inside the 1F1B loop and handed over by a `custom_vjp` (1f1b).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from k25.model.config import K2Config
from k25.model.moe import balance_bias_update
from k25.optim.muon_clip import qk_clip
from k25.train.state import ModelDef, TrainState

LossFn = Callable[[Any, dict], tuple[jnp.ndarray, dict]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    accum_steps: int = 1
    qk_clip_tau: float = 100.0  # 0 disables QK-Clip
    bias_update_rate: float = 0.0  # aux-loss-free balancing step; 0 disables
    text_cfg: K2Config | None = None  # the K2 decoder's config (None: the model has no K2 decoder)
    text_path: tuple[str, ...] = ()  # where the K2 decoder's parameters sit in the params tree

    @classmethod
    def for_decoder(cls, config: Any, text_cfg: K2Config, *, accum_steps: int, multimodal: bool) -> StepConfig:
        """The step of a stage training a K2 decoder, alone or inside a K25Model (`language_model`); a run's
        top-level `config.bias_update_rate` overrides the model's (the sft and rl stages start from a model
        whose config they do not own)."""
        return cls(accum_steps=accum_steps, qk_clip_tau=config.optim.qk_clip_tau,
                   bias_update_rate=float(config.get("bias_update_rate", text_cfg.bias_update_rate)),
                   text_cfg=text_cfg, text_path=("language_model",) if multimodal else ())


def _subtree(tree: dict, path: tuple[str, ...]) -> dict:
    for p in path:
        tree = tree[p]
    return tree


def _with_subtree(tree: dict, path: tuple[str, ...], sub: dict) -> dict:
    if not path:
        return sub
    return {**tree, path[0]: _with_subtree(tree[path[0]], path[1:], sub)}


def _accumulate(grad_fn, params, batch: dict, accum: int):
    """Sum of (loss_sum, grads) and merged aux over `accum` equal microbatches of the batch."""
    if accum == 1:
        return grad_fn(params, batch)
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

    def body(carry, mb):
        # the barrier ties the parameters to this microbatch, so XLA cannot hoist what is derived from them
        # alone (compute-dtype casts, the pipeline's regrouped stage weights, sliced stacks) out of the loop
        # and keep it live through every microbatch (6.3 + 3.2 GB per device in the K2 layout)
        p, mb = jax.lax.optimization_barrier((params, mb))
        (loss, aux), grads = grad_fn(p, mb)
        if carry is None:
            return (loss, aux, grads), None
        closs, caux, cgrads = carry
        merged = {k: (jnp.maximum(caux[k], aux[k]) if k.startswith("max_") else caux[k] + aux[k]) for k in aux}
        return (closs + loss, merged, jax.tree.map(jnp.add, cgrads, grads)), None

    first = jax.tree.map(lambda x: x[0], micro)
    rest = jax.tree.map(lambda x: x[1:], micro)
    carry, _ = body(None, first)
    carry, _ = jax.lax.scan(body, carry, rest)
    loss, aux, grads = carry
    return (loss, aux), grads


def make_train_step(model_def: ModelDef, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, cfg: StepConfig) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The un-jitted step function `(state, batch) -> (state, metrics)`; the caller jits it with shardings."""

    def loss_of(params, buffers, batch):
        return loss_fn(model_def.merge(params, buffers), batch)

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        grad_fn = jax.value_and_grad(lambda p, b: loss_of(p, state.buffers, b), has_aux=True)
        (loss_sum, aux), grads = _accumulate(grad_fn, state.params, batch, cfg.accum_steps)
        n = jnp.maximum(aux["num_tokens"], 1.0)
        loss = loss_sum / n
        grads = jax.tree.map(lambda g: g / n, grads)
        grad_norm = optax.global_norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        metrics: dict[str, jnp.ndarray] = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                                           "num_tokens": aux["num_tokens"]}
        for k, v in aux.items():
            if k not in ("num_tokens", "max_attn_logits", "expert_counts") and v.ndim == 0:
                metrics[k] = v
        tcfg = cfg.text_cfg
        if tcfg is not None:
            max_logits = aux["max_attn_logits"]
            metrics["max_attn_logit"] = jnp.max(max_logits)
            metrics["attn/max_logits"] = max_logits  # (layers, heads), before this step's QK-Clip
            if tcfg.num_moe_layers:
                counts = aux["expert_counts"]
                load = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
                metrics["moe/max_load_over_mean"] = jnp.max(load) * tcfg.n_routed_experts
                metrics["moe/expert_load"] = load.mean(0)
        clips = tcfg is not None and cfg.qk_clip_tau > 0

        def update(params, buffers, opt_state):
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            clipped = jnp.zeros((), jnp.int32)
            if clips:
                text, clipped = qk_clip(_subtree(params, cfg.text_path), aux["max_attn_logits"], tcfg,
                                        cfg.qk_clip_tau)
                params = _with_subtree(params, cfg.text_path, text)
            if tcfg is not None and tcfg.num_moe_layers and cfg.bias_update_rate > 0:
                text_buf = _subtree(buffers, cfg.text_path)
                moe_buf = dict(text_buf["moe_layers"])
                moe_buf["mlp"] = {**moe_buf["mlp"], "bias": balance_bias_update(
                    moe_buf["mlp"]["bias"], aux["expert_counts"], cfg.bias_update_rate)}
                buffers = _with_subtree(buffers, cfg.text_path, {**text_buf, "moe_layers": moe_buf})
            return params, buffers, opt_state, jnp.asarray(clipped, jnp.int32)

        def skip(params, buffers, opt_state):
            return params, buffers, opt_state, jnp.zeros((), jnp.int32)

        # a conditional rather than a select of new against old state: the select reads the old (donated)
        # optimizer state after the update has written the new one, so XLA keeps a copy of it (the Muon
        # momentum: 7.9 GB per device in the K2 layout); under the conditional the update runs in place
        params, buffers, opt_state, clipped = jax.lax.cond(ok, update, skip, state.params, state.buffers,
                                                           state.opt_state)
        if clips:
            metrics["qk_clip/clipped_heads"] = clipped
        streak = jnp.where(ok, 0, state.nonfinite_streak + 1)
        new_state = TrainState(step=state.step + 1, params=params, buffers=buffers, opt_state=opt_state,
                               nonfinite_streak=streak, nonfinite_total=state.nonfinite_total + (~ok).astype(jnp.int32))
        metrics["nonfinite_steps"] = new_state.nonfinite_total
        return new_state, metrics

    return step
