"""Rule-based rewards on answers: exact match, math equivalence, OCR edit distance, counting."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from rapidfuzz.distance import Levenshtein

from k25.rl.rewards.parse import final_answer, parse_number


def _norm(s: str, ignore_case: bool) -> str:
    s = " ".join(s.split())
    return s.casefold() if ignore_case else s


def exact_match(pred: str, gt: str | Sequence[str], *, ignore_case: bool = False) -> float:
    """r = 1 if norm(pred) == norm(g) for some accepted answer g, else 0.

    norm collapses runs of whitespace and strips the ends (and case-folds with `ignore_case`). `pred` is
    the answer string (`parse.final_answer(response)` for a full response); `gt` one answer or a list of
    accepted ones.
    """
    golds = [gt] if isinstance(gt, str) else list(gt)
    if not golds:
        raise ValueError("exact_match: gt is an empty list; give at least one accepted answer")
    p = _norm(pred, ignore_case)
    return float(any(p == _norm(g, ignore_case) for g in golds))


def math_answer(response: str, gt: str) -> float:
    """r = 1 if the response's final answer is mathematically equal to `gt`, else 0.

    math-verify parses both sides (\\boxed{}, LaTeX, plain numbers, sets, intervals; 0.5 == \\frac{1}{2})
    and decides equivalence with sympy. Its plain-text extraction reads only the last number of an
    un-delimited expression ("Answer: x^2 - 1" -> 1), so when that says "not equal" the final answer
    (`parse.final_answer`) is parsed once more as LaTeX math (`$...$`) and compared again. Model text is never
    given to sympy's `parse_expr` (it calls `eval`). math-verify's signal-based timeout only works in the
    main thread, so it is switched off elsewhere.
    """
    from math_verify import parse, verify

    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    as_math = lambda s: s if "$" in s or "\\" in s else f"${s}$"
    gold = parse(as_math(gt), parsing_timeout=timeout)
    if not gold:
        raise ValueError(f"math_answer: the target {gt!r} does not parse as math; write it in LaTeX")
    for pred in (parse(response, parsing_timeout=timeout), parse(as_math(final_answer(response)),
                                                                 parsing_timeout=timeout)):
        if pred and verify(gold, pred, timeout_seconds=timeout):
            return 1.0
    return 0.0


def ocr_score(pred: str, gt: str) -> float:
    """r = 1 - Levenshtein(pred, gt) / max(|pred|, |gt|) (1 when both are empty): the report's OCR reward,
    OmniDocBench's normalised edit distance, on characters."""
    if not isinstance(pred, str) or not isinstance(gt, str):
        raise TypeError(f"ocr_score takes two strings, got {type(pred).__name__} and {type(gt).__name__}")
    return 1.0 - Levenshtein.normalized_distance(pred, gt)


def counting_score(pred: float | int | str | None, gt: int) -> float:
    """r = max(0, 1 - |pred - gt| / max(gt, 1)): 1 for the exact count, linear decay in the relative error,
    0 from an error of 100 % (or of 1 when gt = 0) on.

    The decay is relative so that being off by one is cheap on a crowd and expensive on a pair; it is linear
    so that every step closer is rewarded equally. A string is read with `parse_number` (last number of
    its final answer); None or no number scores 0.
    """
    if isinstance(gt, bool) or not isinstance(gt, int) or gt < 0:
        raise ValueError(f"counting_score: gt must be a non-negative int, got {gt!r}")
    if isinstance(pred, str):
        pred = parse_number(pred)
    if pred is None:
        return 0.0
    return max(0.0, 1.0 - abs(float(pred) - gt) / max(gt, 1))
