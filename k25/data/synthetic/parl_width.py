"""Warm-up data for the PARL width policy (k25.swarm.parl): the orchestrator's observation -> its width.

Each example is one decision of a scripted orchestrator rendered in the width policy's compact format:
`width_prompt(n, b)` (n entities in the registry listing, b the critical-step budget) -> one digit k (0: work
serially, k >= 1: split the entities over k subagents). The behaviour being cloned is a fixed mixture, not
the best width: with probability `serial_fraction` the serial choice, else a width drawn uniformly from 1..9,
so the warmed-up model knows the action format and starts mostly serial, as an untrained orchestrator does;
which widths pay off under which budgets is left to PARL.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from k25.data.synthetic.text import TextTask

MAX_WIDTH = 9


def width_prompt(entities: int, budget: int) -> str:
    """The width policy's observation: what the orchestrator knows once it has read the registry listing."""
    return f"n={entities} b={budget} k="


class ParlWidthTask(TextTask):
    name = "parl_width"

    def __init__(self, seed: int = 0, eval_fraction: float = 0.1, entities: Sequence[int] = (8, 24),
                 budgets: Sequence[int] = (16, 24, 40), serial_fraction: float = 0.5) -> None:
        super().__init__(seed, eval_fraction)
        if len(entities) != 2 or not 1 <= entities[0] <= entities[1]:
            raise ValueError(f"parl_width: entities={entities} must be (low, high) with 1 <= low <= high")
        if not budgets or min(budgets) < 1:
            raise ValueError(f"parl_width: budgets={budgets} must be a non-empty list of positive integers")
        if not 0.0 <= serial_fraction <= 1.0:
            raise ValueError(f"parl_width: serial_fraction={serial_fraction} must be in [0, 1]")
        self.entities, self.budgets, self.serial_fraction = tuple(entities), tuple(budgets), serial_fraction

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        n, b = rng.randint(*self.entities), rng.choice(self.budgets)
        k = 0 if rng.random() < self.serial_fraction else rng.randint(1, MAX_WIDTH)
        return width_prompt(n, b), str(k)
