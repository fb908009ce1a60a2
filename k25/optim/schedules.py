"""Learning-rate schedules (optax schedules, step -> lr) built by joining optax pieces.

* `warmup_cosine`: linear warmup from 0, then cosine decay to final_ratio * peak at total_steps (Moonlight).
* `wsd`: warmup-stable-decay (Kimi K2 pre-training: constant peak for most of training, then a short decay).
  The stable phase can be extended without knowing where the decay will start, which is why K2 uses it.
Warmups start at lr 0 on step 0 (optax convention). Past total_steps every schedule stays at its final value.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import optax


def _check(peak_lr: float, warmup_steps: int, total_steps: int) -> None:
    if peak_lr < 0:
        raise ValueError(f"peak_lr={peak_lr} must be >= 0.")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps={total_steps} must exceed warmup_steps={warmup_steps}.")


def _with_warmup(peak_lr: float, warmup_steps: int, rest: list[optax.Schedule], boundaries: list[int]
                 ) -> optax.Schedule:
    """Prepend a 0 -> peak linear warmup (when warmup_steps > 0) to pieces that start at step warmup_steps."""
    if warmup_steps > 0:
        rest = [optax.linear_schedule(0.0, peak_lr, warmup_steps), *rest]
        boundaries = [warmup_steps, *boundaries]
    if len(rest) == 1:
        return rest[0]
    return optax.join_schedules(rest, boundaries)


def warmup_cosine(peak_lr: float, warmup_steps: int, total_steps: int, final_ratio: float = 0.1) -> optax.Schedule:
    """0 -> peak_lr linearly over warmup_steps, then cosine to final_ratio * peak_lr at total_steps."""
    _check(peak_lr, warmup_steps, total_steps)
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio={final_ratio} must lie in [0, 1].")
    cosine = optax.cosine_decay_schedule(peak_lr, total_steps - warmup_steps, alpha=final_ratio)
    return _with_warmup(peak_lr, warmup_steps, [cosine], [])


def wsd(peak_lr: float, warmup_steps: int, total_steps: int, decay_fraction: float = 0.1, final_ratio: float = 0.0,
        *, decay_shape: Literal["linear", "cosine"] = "linear") -> optax.Schedule:
    """Warmup-stable-decay: warmup to peak_lr, hold it, then decay over the last decay_fraction of total_steps.

    The decay phase is round(decay_fraction * total_steps) steps long, ends at final_ratio * peak_lr on
    total_steps, and is linear (default) or a half cosine (`decay_shape="cosine"`, K2's choice).
    """
    _check(peak_lr, warmup_steps, total_steps)
    if not 0.0 <= decay_fraction <= 1.0:
        raise ValueError(f"decay_fraction={decay_fraction} must lie in [0, 1].")
    if not 0.0 <= final_ratio <= 1.0:
        raise ValueError(f"final_ratio={final_ratio} must lie in [0, 1].")
    decay_steps = round(decay_fraction * total_steps)
    decay_start = total_steps - decay_steps
    if decay_start < warmup_steps:
        raise ValueError(f"the decay ({decay_steps} steps) would start at step {decay_start}, inside the warmup "
                         f"({warmup_steps} steps); lower decay_fraction or warmup_steps.")
    pieces: list[optax.Schedule] = []
    boundaries: list[int] = []
    if decay_start > warmup_steps:
        pieces.append(optax.constant_schedule(peak_lr))
        boundaries.append(decay_start)
    if decay_steps > 0:
        if decay_shape == "linear":
            pieces.append(optax.linear_schedule(peak_lr, final_ratio * peak_lr, decay_steps))
        elif decay_shape == "cosine":
            pieces.append(optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=final_ratio))
        else:
            raise ValueError(f"decay_shape={decay_shape!r} must be 'linear' or 'cosine'.")
    else:
        boundaries = boundaries[:-1]  # no decay: the stable piece runs to the end
    return _with_warmup(peak_lr, warmup_steps, pieces, boundaries)


def constant(peak_lr: float, warmup_steps: int = 0, total_steps: int | None = None) -> optax.Schedule:
    """Linear warmup to peak_lr, then constant (for short runs and benchmarks). total_steps is ignored."""
    del total_steps
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} must be >= 0.")
    return _with_warmup(peak_lr, warmup_steps, [optax.constant_schedule(peak_lr)], [])


SCHEDULES: dict[str, Callable[..., optax.Schedule]] = {
    "warmup_cosine": warmup_cosine,
    "wsd": wsd,
    "constant": constant,
}


def make_schedule(name: str, **kw: Any) -> optax.Schedule:
    """Build a schedule by name (from a config string): one of SCHEDULES, with that function's keywords."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}.")
    return SCHEDULES[name](**kw)
