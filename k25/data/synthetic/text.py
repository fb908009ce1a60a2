"""Seeded synthetic text tasks with checkable answers, one per text column of the report's Table 1.

They stand in for knowledge / reasoning / code benchmarks at a scale where a ~5M-parameter byte-level
model trained for minutes on CPU can learn them: prompts are under 60 bytes, answers 1-6 bytes, and
vocabularies are tiny. Every example is ``dict(prompt=str, answer=str)``; the LM sees
``bos + prompt + answer + eos`` and is scored by ``exact_match`` on the greedy continuation of the prompt.

Splits: ``"train"`` and ``"eval"``. A prompt belongs to exactly one split, decided by a stable hash of
(task seed, prompt) -- or, for ``knowledge``, by which facts are held out -- so no eval prompt ever
appears in train. Example ``index`` and ``stream`` only pick *which* example of a split is drawn.
"""

from __future__ import annotations

import abc
import random
import zlib
from typing import ClassVar

Example = dict[str, str]
SPLITS = ("train", "eval")


def exact_match(pred: str, answer: str) -> bool:
    """Compares the first line of a decoded continuation with the answer, whitespace-normalized.

    Generation may run past the answer (a model that misses eos keeps going on a new line), and
    tokenizers may add a leading space, so only the first non-empty line counts.
    """

    def norm(s: str) -> str:
        return " ".join(s.strip().split("\n", 1)[0].split())

    return norm(pred) == norm(answer)


class TextTask(abc.ABC):
    """Base: deterministic ``example(split, index, stream)`` by rejection-sampling ``_draw`` into its split."""

    name: ClassVar[str]

    def __init__(self, seed: int = 0, eval_fraction: float = 0.1) -> None:
        self.seed = seed
        self.eval_fraction = eval_fraction

    @abc.abstractmethod
    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        """Returns (prompt, answer); ``split`` is a hint that may make rejection cheaper."""

    def split_of(self, prompt: str) -> str:
        """The one split this prompt belongs to (a stable hash, independent of Python's hash seed)."""
        h = zlib.crc32(f"{self.name}|{self.seed}|{prompt}".encode()) % 10_000
        return "eval" if h < self.eval_fraction * 10_000 else "train"

    def example(self, split: str, index: int, stream: int = 0) -> Example:
        """The ``index``-th example of ``split`` in sampling stream ``stream`` (e.g. the pipeline seed)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rng = random.Random(f"{self.name}/{self.seed}/{split}/{stream}/{index}")
        for _ in range(10_000):
            prompt, answer = self._draw(rng, split)
            if self.split_of(prompt) == split:
                return {"prompt": prompt, "answer": answer}
        raise RuntimeError(f"{self.name}: could not draw a {split} example; is eval_fraction 0 or 1?")

    def examples(self, split: str, n: int, *, stream: int = 0, unique: bool = True) -> list[Example]:
        """``n`` examples (fewer if the split has fewer distinct prompts and ``unique``), in a fixed order."""
        out: list[Example] = []
        seen: set[str] = set()
        for i in range(50 * n + 1000):
            if len(out) == n:
                break
            ex = self.example(split, i, stream)
            if unique and ex["prompt"] in seen:
                continue
            seen.add(ex["prompt"])
            out.append(ex)
        return out

    exact_match = staticmethod(exact_match)

    @staticmethod
    def score(pred: str, example: Example) -> bool:
        """Held-out right/wrong of a greedy continuation: `exact_match` with the example's answer. A task whose
        answer text is not the thing checked (worked steps before a final answer) overrides it."""
        return exact_match(pred, example["answer"])


_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"
_COLORS = ("red", "blue", "green", "gold", "gray", "pink", "teal", "white")
_ANIMALS = ("owl", "fox", "bear", "wolf", "elk", "cat", "yak", "eel")
# relation -> phrase used in every template; all phrases read "the <phrase> of <Entity>".
_RELATIONS = {"capital": "capital", "color": "flag color", "animal": "national animal"}


class KnowledgeTask(TextTask):
    """Facts about a seeded world of made-up countries: capital (made-up city), flag color, national animal.

    Train states each fact in four templates, e.g. ``"The capital of Zorvia is " -> "Melk"``,
    ``"Zorvia's capital is "``, ``"In Zorvia, the capital is "`` and the question form
    ``"Q: What is the capital of Zorvia? A: "``. A held-out ``eval_fraction`` of the facts never appears
    in question form in train (only stated); eval asks exactly those questions. Every template contains
    the entity right after the relation phrase, which is what lets a small model carry a fact from
    statement to question. ``facts`` lists the whole world: (entity, relation, value).
    """

    name = "knowledge"
    QUESTION = "Q: What is the {r} of {e}? A: "
    STATEMENTS = ("The {r} of {e} is ", "{e}'s {r} is ", "In {e}, the {r} is ")

    def __init__(self, seed: int = 0, eval_fraction: float = 0.25, num_entities: int = 30) -> None:
        super().__init__(seed, eval_fraction)
        rng = random.Random(f"knowledge-world/{seed}")
        names: set[str] = set()

        def word(syllables: int, coda: bool) -> str:
            while True:
                w = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
                w = (w + rng.choice(_CONSONANTS) if coda else w).capitalize()
                if w not in names:
                    names.add(w)
                    return w

        self.entities = [word(2, False) + rng.choice(("a", "ia", "or", "en")) for _ in range(num_entities)]
        self.facts: list[tuple[str, str, str]] = []
        for e in self.entities:
            self.facts.append((e, "capital", word(2, rng.random() < 0.3)))
            self.facts.append((e, "color", rng.choice(_COLORS)))
            self.facts.append((e, "animal", rng.choice(_ANIMALS)))
        order = list(range(len(self.facts)))
        rng.shuffle(order)
        held = order[: round(eval_fraction * len(self.facts))]
        self._heldout = {self._question(*self.facts[i][:2]) for i in held}
        self._heldout_facts = [self.facts[i] for i in sorted(held)]

    def _question(self, e: str, rel: str) -> str:
        return self.QUESTION.format(r=_RELATIONS[rel], e=e)

    def split_of(self, prompt: str) -> str:
        return "eval" if prompt in self._heldout else "train"

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        if split == "eval":
            e, rel, value = rng.choice(self._heldout_facts)
            return self._question(e, rel), value
        e, rel, value = rng.choice(self.facts)
        template = rng.choice((self.QUESTION, *self.STATEMENTS))
        return template.format(r=_RELATIONS[rel], e=e), value


class ReasoningTask(TextTask):
    """Short multi-step problems over single digits, four kinds drawn uniformly:

    - arithmetic, 2-3 ops of + and -:   ``"Q: 3+4-2=? A: "`` -> ``"5"`` (answers may be negative)
    - comparison of three digits:       ``"Q: max(3,8,5)? A: "`` -> ``"8"`` (or ``min``)
    - ordering of three digits:         ``"Q: sort 5 2 8? A: "`` -> ``"2 5 8"``
    - boolean logic, Python precedence: ``"Q: T and not F or F? A: "`` -> ``"T"``
    """

    name = "reasoning"

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        kind = rng.randrange(4)
        digits = [rng.randint(0, 9) for _ in range(rng.choice((3, 4)) if kind == 0 else 3)]
        if kind == 0:
            expr = str(digits[0]) + "".join(rng.choice("+-") + str(d) for d in digits[1:])
            return f"Q: {expr}=? A: ", str(eval(expr))
        if kind == 1:
            fn = rng.choice(("max", "min"))
            return f"Q: {fn}({','.join(map(str, digits))})? A: ", str(max(digits) if fn == "max" else min(digits))
        if kind == 2:
            return f"Q: sort {' '.join(map(str, digits))}? A: ", " ".join(map(str, sorted(digits)))
        terms = [("not " if rng.random() < 0.3 else "") + rng.choice("TF") for _ in range(rng.choice((2, 3)))]
        expr = terms[0] + "".join(f" {rng.choice(('and', 'or'))} {t}" for t in terms[1:])
        value = eval(expr.replace("T", "True").replace("F", "False"))
        return f"Q: {expr}? A: ", "T" if value else "F"


class CodeTask(TextTask):
    """Tiny straight-line Python programs; the answer is what they print.

    2-3 assignments over + - * with every value within [-20, 20] (which keeps products small), sometimes
    reassigning a variable, then one print::

        "a=3\\nb=a*2\\na=b-1\\nprint(a+b)\\nOutput: " -> "11"
    """

    name = "code"

    def _draw(self, rng: random.Random, split: str) -> tuple[str, str]:
        while True:
            names = rng.sample("abcxyz", 3)
            env = {names[0]: rng.randint(1, 9)}
            lines = [f"{names[0]}={env[names[0]]}"]
            for k in range(1, rng.choice((2, 3))):
                defined = list(env)
                target = rng.choice(defined) if rng.random() < 0.25 else names[k]
                lhs = rng.choice(defined)
                rhs = rng.choice(defined) if rng.random() < 0.4 else str(rng.randint(1, 9))
                expr = f"{lhs}{rng.choice('+-*')}{rhs}"
                env[target] = eval(expr, {}, dict(env))
                lines.append(f"{target}={expr}")
            defined = list(env)
            out = rng.choice(defined)
            if rng.random() < 0.5:
                out += rng.choice("+-*") + (rng.choice(defined) if rng.random() < 0.5 else str(rng.randint(1, 9)))
            result = eval(out, {}, dict(env))
            if max(abs(v) for v in (*env.values(), result)) <= 20:
                return "\n".join(lines) + f"\nprint({out})\nOutput: ", str(result)


TASKS: dict[str, type[TextTask]] = {t.name: t for t in (KnowledgeTask, ReasoningTask, CodeTask)}
