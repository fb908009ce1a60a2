"""Reading a model's answer out of its response text.

Rewards score structured predictions (boxes, points, numbers); a response is text. The final answer is the
content of the last `\\boxed{...}`, else what follows the last "Answer:", else the whole response (the
thinking part is a separate field of the chat message and is never scored). Coordinates are read as
bracketed number groups, so "[(10, 20, 30, 40), (5, 5, 9, 9)]", "(1,2,3,4) and [5,6,7,8]" and a JSON
list of lists all parse.
"""

from __future__ import annotations

import re

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ANSWER = re.compile(r"answer\s*[:：]", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: no usable boxed answer


def final_answer(text: str) -> str:
    """The last \\boxed{...} content, else the text after the last 'Answer:', else the stripped text."""
    if not isinstance(text, str):
        raise TypeError(f"response must be str, got {type(text).__name__}")
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    found = list(_ANSWER.finditer(text))
    if found:
        return text[found[-1].end():].strip()
    return text.strip()


def _groups(text: str, n: int) -> list[tuple[float, ...]]:
    sep = r"\s*[,;]?\s*"
    pat = re.compile(r"[\[\(]\s*" + sep.join([f"({_NUM})"] * n) + r"\s*[\]\)]")
    return [tuple(float(v) for v in m.groups()) for m in pat.finditer(text)]


def parse_boxes(text: str) -> list[tuple[float, float, float, float]]:
    """Every bracketed group of four numbers in the final answer, as (x1, y1, x2, y2)."""
    return _groups(final_answer(text), 4)  # type: ignore[return-value]


def parse_points(text: str) -> list[tuple[float, float]]:
    """Every bracketed pair of numbers in the final answer, as (x, y)."""
    return _groups(final_answer(text), 2)  # type: ignore[return-value]


parse_polygon = parse_points  # a polygon is its vertex list, in order


def parse_number(text: str) -> float | None:
    """The last number in the final answer (commas as thousands separators allowed), or None."""
    found = re.findall(_NUM, final_answer(text).replace(",", ""))
    return float(found[-1]) if found else None
