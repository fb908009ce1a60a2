"""Arithmetic with worked steps and a variable number of redundant re-checks: a task whose responses vary in
length at equal correctness, so that a length-control method such as Toggle (report Eq. 2) has something to
cut (experiments/rl_text.py `toggle_*`).

The reasoning task's answers are 1-5 bytes with nothing before them, so every correct response there has the
same length and a token budget cannot bind. Here a response is the chain of partial results, then 0 to
`max_checks` re-checks that redo the same chain, then the answer::

    "Q: 3+4-2=? A: "  ->  "3+4=7 7-2=5 check 3+4=7 7-2=5 Answer: 5"

The number of re-checks is drawn uniformly and independently of the problem, so the warmed-up policy learns
to emit each count about equally often and the check count is a free choice that never changes the answer:
the re-checks are the redundant "overthinking" that the report's budget-limited phase is meant to remove.
Each example is `dict(prompt, answer, target)`: `answer` the whole response (what the `lm` stage trains),
`target` the final number (what the RL reward's `exact_match` on `final_answer` checks, and what `score`
compares for the `lm` stage's held-out exact match).
"""

from __future__ import annotations

import random

from k25.data.synthetic.text import Example, TextTask, exact_match

ANSWER = "Answer:"


class StepwiseTask(TextTask):
    """`terms` single digits joined by + and -, solved left to right; `max_checks` re-checks at most."""

    name = "stepwise"

    def __init__(self, seed: int = 0, eval_fraction: float = 0.1, terms: tuple[int, ...] = (3,),
                 max_checks: int = 2) -> None:
        super().__init__(seed, eval_fraction)
        if not terms or min(terms) < 2:
            raise ValueError(f"stepwise: terms={terms} must list term counts >= 2 (one operation at least)")
        if max_checks < 0:
            raise ValueError(f"stepwise: max_checks={max_checks} must be >= 0")
        self.terms, self.max_checks = tuple(terms), max_checks

    @staticmethod
    def chain(digits: list[int], ops: list[str]) -> tuple[list[str], int]:
        """The partial results left to right, as "a+b=c" steps, and the final value."""
        steps, acc = [], digits[0]
        for op, d in zip(ops, digits[1:]):
            nxt = acc + d if op == "+" else acc - d
            steps.append(f"{acc}{op}{d}={nxt}")
            acc = nxt
        return steps, acc

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        n = rng.choice(self.terms)
        digits = [rng.randint(0, 9) for _ in range(n)]
        ops = [rng.choice("+-") for _ in range(n - 1)]
        prompt = "Q: " + str(digits[0]) + "".join(o + str(d) for o, d in zip(ops, digits[1:])) + "=? A: "
        steps, value = self.chain(digits, ops)
        work = " ".join(steps)
        checks = rng.randint(0, self.max_checks)
        return prompt, " ".join([work] + [f"check {work}"] * checks + [f"{ANSWER} {value}"])

    def example(self, split: str, index: int, stream: int = 0) -> Example:
        ex = super().example(split, index, stream)
        return {**ex, "target": ex["answer"].rsplit(ANSWER, 1)[1].strip()}

    @staticmethod
    def score(pred: str, example: Example) -> bool:
        """Right when the first line's text after its last "Answer:" is the target (the re-checks are free);
        a response without "Answer:" is wrong."""
        line = pred.strip().split("\n", 1)[0]
        return ANSWER in line and exact_match(line.rsplit(ANSWER, 1)[1], example["target"])
