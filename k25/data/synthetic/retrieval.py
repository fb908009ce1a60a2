"""Passkey / needle-in-a-haystack documents for long-context training and evaluation (report §4.3, the
32k -> 256k mid-training stage in miniature).

A document hides `keys` needles " <name> key is <5 digits>. " in a filler of repeated sentences (the classic
passkey haystack) and ends by restating the queried needle's prefix " <name> key is "; the answer is that
needle's digits. One key is the passkey test, several are multi-key retrieval (the others are distractors
that share the template). Lengths are in byte-tokenizer tokens and exact: bos + prompt + answer + eos has
exactly `length` tokens, so an eval batch of one length needs no padding. `probe` places the queried needle at
a given depth (fraction of the haystack before it) for depth x length grids.
"""

from __future__ import annotations

import random

from k25.data.synthetic.text import Example, TextTask

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NAMES = ("red", "blue", "green", "gold", "gray", "pink", "teal", "white")
DIGITS = 5


class RetrievalTask(TextTask):
    """Training documents of `min_len`..`max_len` tokens with 1..`max_keys` needles at uniform depths."""

    name = "retrieval"

    def __init__(self, seed: int = 0, eval_fraction: float = 0.1, min_len: int = 48, max_len: int = 128,
                 max_keys: int = 3) -> None:
        super().__init__(seed, eval_fraction)
        if not 0 < max_keys <= len(NAMES):
            raise ValueError(f"retrieval: max_keys={max_keys} must be in [1, {len(NAMES)}].")
        if not self.min_length(1) <= min_len <= max_len or max_len < self.min_length(max_keys):
            raise ValueError(f"retrieval: need {self.min_length(1)} <= min_len={min_len} <= max_len={max_len} and "
                             f"max_len >= {self.min_length(max_keys)} (the needles and question of {max_keys} keys).")
        self.min_len, self.max_len, self.max_keys = min_len, max_len, max_keys

    @staticmethod
    def min_length(keys: int) -> int:
        """Tokens of a document with no filler: bos, the longest needles and question, the answer, eos."""
        longest = max(NAMES, key=len)
        return 2 + keys * len(f" {longest} key is {'0' * DIGITS}. ") + len(f" {longest} key is ") + DIGITS

    def document(self, rng: random.Random, length: int, depth: float, keys: int) -> Example:
        """A document of exactly `length` tokens whose queried needle starts `depth` of the way into the filler."""
        if not 0 <= depth <= 1:
            raise ValueError(f"retrieval: depth={depth} must be in [0, 1].")
        names = rng.sample(NAMES, keys)
        values = [str(rng.randrange(10 ** (DIGITS - 1), 10**DIGITS)) for _ in names]
        needles = [f" {n} key is {v}. " for n, v in zip(names, values)]  # spaced off the (cut) filler words
        # the question restates the needle's prefix, so an induction head (match the context, copy what
        # followed) answers it; with several keys the name is what tells the needles apart
        question = f" {names[0]} key is "
        filler_len = length - 2 - sum(map(len, needles)) - len(question) - DIGITS
        if filler_len < 0:
            raise ValueError(f"retrieval: length={length} is below the {length - filler_len} tokens that {keys} "
                             "key(s) need.")
        start = rng.randrange(len(FILLER))
        filler = (FILLER * (2 + filler_len // len(FILLER)))[start:start + filler_len]
        # the queried needle at `depth`, distractors at uniform depths; ties keep the queried one first
        cuts = sorted([(round(depth * filler_len), 0)] + [(rng.randrange(filler_len + 1), i) for i in
                                                            range(1, keys)])
        parts, prev = [], 0
        for cut, i in cuts:
            parts += [filler[prev:cut], needles[i]]
            prev = cut
        prompt = "".join(parts) + filler[prev:] + question
        return {"prompt": prompt, "answer": values[0]}

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        keys = rng.randint(1, self.max_keys)
        length = rng.randint(max(self.min_len, self.min_length(keys)), self.max_len)
        ex = self.document(rng, length, rng.random(), keys)
        return ex["prompt"], ex["answer"]

    def probe(self, length: int, depth: float, keys: int, index: int) -> Example:
        """The `index`-th eval document of a (length, depth, keys) cell. Its 5-digit values and filler offset
        are random, so it coincides with a training document with negligible probability."""
        rng = random.Random(f"{self.name}-probe/{self.seed}/{length}/{depth}/{keys}/{index}")
        return self.document(rng, length, depth, keys)
