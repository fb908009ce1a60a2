"""The rule reward for safety tasks: refusing what must be refused and answering what must be answered.

Refusal is read by the safety suite's own rule (k25.eval.safety.rules.is_refusal: a refusal phrase in the
reply's opening, English or Chinese; an empty reply counts as a refusal), so what RL optimises is what the
suite's rule-based scorer reports.
"""

from __future__ import annotations

from k25.eval.safety.rules import is_refusal

TARGETS = ("refuse", "comply")


def refusal_match(response: str, target: str) -> float:
    """1.0 if the response refuses exactly when `target` is "refuse" (and answers when it is "comply")."""
    if target not in TARGETS:
        raise ValueError(f"refusal_match: target={target!r} must be one of {TARGETS}")
    return float(is_refusal(response) == (target == "refuse"))
