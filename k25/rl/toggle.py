"""Toggle (Eq. 2 of the report): alternate budget-limited and standard-scaling phases every m iterations.

For iteration t and prompt x with K responses y_1..y_K and rewards r_i:

    phase(t) = floor(t / m) mod 2
    phase 0:  r~(x, y_i) = r_i * I{ mean_k r_k < lambda  or  |y_i| <= budget(x) }
    phase 1:  r~(x, y_i) = r_i
    budget(x) = Percentile({|y_j| : r(x, y_j) = 1}, rho)

The budget is fixed the first time a prompt is seen (the report estimates it "once at the beginning of
training"; a data set too large to roll out up front gets each prompt's budget from its first group, or from
`fit` on a warm-up pass) and never changes afterwards. A prompt with no correct response has no budget and is
never constrained. "Correct" is r >= `correct_threshold` (1 for binary rewards). The percentile is numpy's
linear interpolation. The whole state is a JSON-able dict (`state_dict` / `from_state_dict`) so the trainer's
checkpoint holds it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class ToggleConfig:
    """rho: percentile (0-100) of the correct responses' lengths that sets budget(x). lam: the mean-accuracy
    threshold lambda above which phase 0 enforces the budget. m: iterations per phase. correct_threshold: a
    reward at least this counts as correct for the budget. enabled: False turns Toggle into the identity
    (the comparison baseline is one switch away)."""

    rho: float = 50.0
    lam: float = 0.5
    m: int = 10
    correct_threshold: float = 1.0
    enabled: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.rho <= 100.0:
            raise ValueError(f"toggle.rho={self.rho}: a percentile in [0, 100]")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"toggle.lam={self.lam}: a mean-accuracy threshold in [0, 1]")
        if not (isinstance(self.m, int) and self.m >= 1):
            raise ValueError(f"toggle.m={self.m}: iterations per phase, an int >= 1")


class Toggle:
    """Per-prompt budgets (fixed once) and the phase schedule; `apply` rewrites one group's rewards."""

    def __init__(self, config: ToggleConfig | None = None, budgets: Mapping[str, float | None] | None = None):
        self.config = config or ToggleConfig()
        self.budgets: dict[str, float | None] = dict(budgets or {})

    def phase(self, step: int) -> int:
        """0 (budget-limited) or 1 (standard scaling) for training iteration `step`."""
        return (int(step) // self.config.m) % 2

    def _check(self, rewards: Sequence[float], lengths: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        r, n = np.asarray(rewards, dtype=np.float64), np.asarray(lengths, dtype=np.float64)
        if r.ndim != 1 or r.shape != n.shape or r.size == 0:
            raise ValueError(f"toggle: rewards {r.shape} and lengths {n.shape} must be the same non-empty (K,)")
        return r, n

    def estimate(self, rewards: Sequence[float], lengths: Sequence[int]) -> float | None:
        """Eq. 2 on one group: the rho-th percentile of the correct responses' lengths (None if none is)."""
        r, n = self._check(rewards, lengths)
        correct = n[r >= self.config.correct_threshold]
        return float(np.percentile(correct, self.config.rho)) if correct.size else None

    def observe(self, key: str, rewards: Sequence[float], lengths: Sequence[int]) -> float | None:
        """Fix budget(key) from this group if the prompt has none yet; return the (possibly older) budget."""
        if key not in self.budgets:
            self.budgets[key] = self.estimate(rewards, lengths)
        return self.budgets[key]

    def fit(self, groups: Mapping[str, tuple[Sequence[float], Sequence[int]]]) -> None:
        """Fix the budgets of many prompts from a warm-up rollout pass: {key: (rewards, lengths)}."""
        for key, (rewards, lengths) in groups.items():
            self.observe(key, rewards, lengths)

    def apply(self, step: int, key: str, rewards: Sequence[float], lengths: Sequence[int]) -> np.ndarray:
        """The Toggle rewards r~ for one prompt's K responses at iteration `step` (float64 (K,))."""
        r, n = self._check(rewards, lengths)
        if not self.config.enabled:
            return r
        budget = self.observe(key, rewards, lengths)
        if self.phase(step) == 1 or budget is None or r.mean() < self.config.lam:
            return r
        return np.where(n <= budget, r, 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"config": dataclasses.asdict(self.config), "budgets": dict(self.budgets)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Toggle:
        return cls(ToggleConfig(**state["config"]), state["budgets"])
