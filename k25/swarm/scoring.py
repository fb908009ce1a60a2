"""Scoring the offline tasks the way WideSearch scores tables, plus exact-match answers.

WideSearch (ByteDance-Seed/WideSearch, `src/evaluation/evaluation.py`, `evaluate_single_query`): prediction
and gold tables are de-duplicated on the unique (key) columns and inner-joined on them; in a matched row the
key cells count as correct and every other cell is compared by the column's metric. Then
  item precision = correct cells / (predicted rows x columns),  item recall = correct cells / (gold rows x columns)
  row precision  = fully correct rows / predicted rows,         row recall  = fully correct rows / gold rows
and F1 = 2PR/(P+R) (0 when P+R = 0). The table scores 1 ("success") only when all four are 1.
Here every cell is compared by exact match after normalising case and whitespace (WideSearch also has LLM-judge,
number- and date-tolerant metrics for real web answers; our generated answers are exact strings). Where
WideSearch scores a table whose columns differ from the gold ones as 0, a missing cell here just scores 0 and
predicted columns the gold table lacks are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

_WS = re.compile(r"\s+")


def normalize_cell(value) -> str:
    """Case- and whitespace-insensitive form of a cell: lower case, runs of whitespace collapsed, stripped."""
    if value is None:
        return ""
    return _WS.sub(" ", str(value)).strip().lower()


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 1e-9 else 0.0


def _columns(gold_rows: Sequence[Mapping]) -> list[str]:
    cols: list[str] = []
    for row in gold_rows:
        cols += [c for c in row if c not in cols]
    return cols


def _normalize_rows(rows: Sequence[Mapping], columns: list[str], keys: list[str], what: str) -> dict:
    """Rows keyed by their normalised key cells, first occurrence kept (WideSearch drops duplicates)."""
    by_norm_col = {normalize_cell(c): c for c in columns}
    out: dict[tuple, dict[str, str]] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{what}[{i}] must be a dict of column -> cell, got {type(row).__name__}")
        cells = {c: "" for c in columns}
        for name, value in row.items():
            col = by_norm_col.get(normalize_cell(name))
            if col is not None:
                cells[col] = normalize_cell(value)
        out.setdefault(tuple(cells[k] for k in keys), cells)
    return out


def score_table(pred_rows: Sequence[Mapping], gold_rows: Sequence[Mapping], key: str | Sequence[str]
                ) -> dict[str, float]:
    """`{"item_f1", "row_f1", "success"}` of a predicted table against the gold one (rows as dicts).

    Rows are matched on the `key` column(s); cells are compared after `normalize_cell`. Column names are
    matched the same way. The column set is the gold table's.
    """
    keys = [key] if isinstance(key, str) else list(key)
    if not gold_rows:
        raise ValueError("gold_rows is empty: a table task needs at least one gold row")
    columns = _columns(gold_rows)
    missing = [k for k in keys if k not in columns]
    if missing:
        raise ValueError(f"key column(s) {missing} are not columns of gold_rows (columns: {columns})")
    gold = _normalize_rows(gold_rows, columns, keys, "gold_rows")
    pred = _normalize_rows(pred_rows, columns, keys, "pred_rows")
    tp_item = tp_row = 0
    for k in gold.keys() & pred.keys():
        g, p = gold[k], pred[k]
        cells = [1 if (c in keys or g[c] == p[c]) else 0 for c in columns]
        tp_item += sum(cells)
        tp_row += min(cells)
    n_pred, n_gold, n_col = len(pred), len(gold), len(columns)
    p_row = tp_row / n_pred if n_pred else 0.0
    r_row = tp_row / n_gold
    p_item = tp_item / (n_pred * n_col) if n_pred else 0.0
    r_item = tp_item / (n_gold * n_col)
    success = float(p_row == r_row == p_item == r_item == 1.0)
    return {"item_f1": _f1(p_item, r_item), "row_f1": _f1(p_row, r_row), "success": success}


_TABLE_LINE = re.compile(r"^\s*\|(.*)\|\s*$")
_SEPARATOR = re.compile(r"^\s*:?-{2,}:?\s*$")


def parse_markdown_table(text: str) -> list[dict[str, str]]:
    """Rows of the last markdown (pipe) table in `text`, as dicts keyed by its header; [] when there is none."""
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in (text or "").splitlines():
        m = _TABLE_LINE.match(line)
        if m:
            current.append([c.strip() for c in m.group(1).split("|")])
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    for table in reversed(tables):
        if len(table) >= 2 and all(_SEPARATOR.match(c) for c in table[1]):
            header, body = table[0], table[2:]
            return [dict(zip(header, row + [""] * (len(header) - len(row)))) for row in body]
    return []


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str]) -> str:
    """Rows as a markdown table with the given columns (what policies answer with)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


_ANSWER = re.compile(r"^\s*\**\s*(?:final\s+)?answer\s*\**\s*[:：]\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)


def extract_answer(text: str) -> str:
    """The short answer of a deep-search or document task: the last `Answer: ...` line, else the last line."""
    found = _ANSWER.findall(text or "")
    if found:
        return found[-1].strip().strip("*").strip()
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


_NUMBER = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def _answer_form(value: str) -> str:
    value = normalize_cell(value).rstrip(".")
    return value.replace(",", "") if _NUMBER.match(value) else value


def score_answer(text: str, gold: str) -> dict[str, float]:
    """`{"success"}`: 1.0 when the extracted answer equals the gold one after `normalize_cell` (a trailing
    period and thousands separators in a number are ignored)."""
    return {"success": float(_answer_form(extract_answer(text)) == _answer_form(gold))}
