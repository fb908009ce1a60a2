"""Optimizer and learning-rate schedule from `config.optim`."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
import optax

from k25.optim.muon_clip import adamw, muon_clip
from k25.optim.schedules import make_schedule

OPTIMIZERS = ("muon_clip", "adamw")


def build_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    kw: dict[str, Any] = dict(peak_lr=optim.lr, warmup_steps=optim.warmup_steps, total_steps=total_steps)
    if optim.schedule == "warmup_cosine":
        kw["final_ratio"] = optim.final_lr_ratio
    elif optim.schedule == "wsd":
        kw.update(decay_fraction=optim.decay_fraction, final_ratio=optim.final_lr_ratio)
    try:
        return make_schedule(optim.schedule, **kw)
    except ValueError as e:
        raise ValueError(f"config.optim: {e}") from None


def build_optimizer(optim: ml_collections.ConfigDict, params: Any, total_steps: int
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """`optim.trainable` (optional): param path prefixes that train; every other parameter is frozen."""
    schedule = build_schedule(optim, total_steps)
    trainable = tuple(optim.get("trainable", None) or ())
    if optim.name == "muon_clip":
        tx = muon_clip(params, learning_rate=schedule, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2,
                       muon_momentum=optim.muon_momentum, ns_steps=optim.ns_steps, rms_scale=optim.rms_scale,
                       trainable=trainable, muon_mu_dtype=_mu_dtype(optim))
    elif optim.name == "adamw":
        tx = adamw(params, learning_rate=schedule, weight_decay=optim.weight_decay, b1=optim.b1, b2=optim.b2,
                   trainable=trainable)
    else:
        raise ValueError(f"config.optim.name={optim.name!r} is unknown; choose one of {OPTIMIZERS}.")
    return tx, schedule


def _mu_dtype(optim: ml_collections.ConfigDict) -> Any:
    """`optim.muon_mu_dtype`: "" keeps the momentum in the parameters' dtype, else a float dtype name."""
    name = str(optim.get("muon_mu_dtype", "") or "")
    if name and name not in ("float32", "bfloat16"):
        raise ValueError(f"config.optim.muon_mu_dtype={name!r} is not supported; use '' (the parameters' dtype), "
                         "'float32' or 'bfloat16'.")
    return jnp.dtype(name) if name else None


def default_optim_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        name="muon_clip", lr=2e-3, schedule="warmup_cosine", warmup_steps=20, final_lr_ratio=0.1,
        decay_fraction=0.2, weight_decay=0.1, b1=0.9, b2=0.95, muon_momentum=0.95, ns_steps=5, rms_scale=0.2,
        qk_clip_tau=100.0, accum_steps=1, muon_mu_dtype="",
    ))
