"""From inspect logs to the suite's figures: refusal per category with its standard error, the English-Chinese
gaps, judge-rule agreement, and a side-by-side markdown table (the shape of the brief's model comparison).

Standard errors are inspect's: sample std (ddof=1) / sqrt(n), 0 for n < 2; a difference of two independent
rates has sqrt(se1^2 + se2^2).
"""

from __future__ import annotations

import math
from collections import defaultdict

from inspect_ai.log import EvalLog

SCORER = "safety_scorer"


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def sample_rows(log: EvalLog) -> list[dict]:
    """One row per sample: the score's metadata plus `refusal` (the deciding value). A sample that errored (the
    model's endpoint refused the request, a tool crashed) has no score: its row carries `error` instead and is
    counted, not scored."""
    if log.status not in ("success", "error") or log.samples is None:
        raise RuntimeError(f"task {log.eval.task} on {log.eval.model} did not run ({log.status}): {log.error}")
    rows = []
    for s in log.samples:
        score = (s.scores or {}).get(SCORER)
        if score is None:
            rows.append({"category": s.metadata["category"], "kind": s.metadata["kind"], "id": s.id,
                         "error": str(s.error.message if s.error else "no score")[:500]})
            continue
        rows.append({**score.metadata, "id": s.id, "refusal": float(score.value)})
    return rows


def summarize(rows: list[dict]) -> dict[str, dict]:
    """category -> refusal_rate, stderr, n, rule_refusal_rate, judge agreement (where a judge decided), for
    multiple choice bias_rate (ambiguous items) and accuracy, for capability probes solve_rate."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    for r in rows:
        if "error" in r:
            errors[r["category"]] += 1
        else:
            by_cat[r["category"]].append(r)
    out: dict[str, dict] = {}
    for cat in sorted(errors.keys() - by_cat.keys()):
        out[cat] = {"refusal_rate": None, "stderr": None, "n": 0, "errors": errors[cat]}
    for cat, rs in sorted(by_cat.items()):
        rate, se = mean_stderr([r["refusal"] for r in rs])
        rule_rate, rule_se = mean_stderr([r["rule_refusal"] for r in rs])
        stats = {"refusal_rate": rate, "stderr": se, "n": len(rs), "errors": errors[cat],
                 "rule_refusal_rate": rule_rate, "rule_stderr": rule_se}
        judged = [r for r in rs if r.get("judge_refusal") is not None]
        stats["judge_n"] = len(judged)
        stats["judge_errors"] = sum(1 for r in rs if r.get("judge_error"))
        if judged:
            agree, agree_se = mean_stderr([float(round(r["judge_refusal"]) == round(r["rule_refusal"]))
                                           for r in judged])
            stats["judge_rule_agreement"], stats["agreement_stderr"] = agree, agree_se
        if rs[0]["kind"] == "capability":
            stats["solve_rate"], stats["solve_stderr"] = mean_stderr([float(r["solved"]) for r in rs])
        if rs[0]["kind"] == "choice":
            ambig = [r for r in rs if r["condition"] == "ambig"]
            stats["bias_rate"], stats["bias_stderr"] = mean_stderr([float(r["biased"]) for r in ambig])
            stats["accuracy"], stats["accuracy_stderr"] = mean_stderr([float(r["correct"]) for r in rs])
        out[cat] = stats
    return out


def _diff(a: list[float], b: list[float]) -> dict:
    (ma, sa), (mb, sb) = mean_stderr(a), mean_stderr(b)
    return {"value": mb - ma, "stderr": math.sqrt(sa ** 2 + sb ** 2), "n": [len(a), len(b)]}


def gaps(rows: list[dict]) -> dict[str, dict]:
    """The English-Chinese and side-to-side differences of refusal rates (value, stderr, n of each side):

    - censorship_zh_minus_en: sensitive topics, refusal in Chinese minus in English;
    - censorship_control_zh_minus_en: the same on the control topics (events elsewhere);
    - political_bias_<lang>: refusal on side b (China-related) minus side a, per language.
    """
    out: dict[str, dict] = {}
    rows = [r for r in rows if "error" not in r]
    cens = [r for r in rows if r["category"].startswith("censorship_")]
    for key, control in (("censorship_zh_minus_en", False), ("censorship_control_zh_minus_en", True)):
        sel = [r for r in cens if bool(r.get("control")) == control]
        if sel:
            out[key] = _diff([r["refusal"] for r in sel if r["lang"] == "en"],
                             [r["refusal"] for r in sel if r["lang"] == "zh"])
    for lang in ("en", "zh"):
        sel = [r for r in rows if r["category"] == f"political_bias_{lang}"]
        if sel:
            out[f"political_bias_{lang}"] = _diff([r["refusal"] for r in sel if r["side"] == "a"],
                                                  [r["refusal"] for r in sel if r["side"] == "b"])
    return out


def _fmt(stats: dict | None, key: str = "refusal_rate", se: str = "stderr") -> str:
    if not stats or key not in stats or stats[key] is None or math.isnan(stats[key]):
        return "-"
    errors = f" ({stats['errors']} errors)" if key == "refusal_rate" and stats.get("errors") else ""
    return f"{stats[key]:.2f} ± {stats[se]:.2f}{errors}"


def markdown_table(report: dict[str, dict[str, dict]], all_gaps: dict[str, dict[str, dict]]) -> str:
    """Refusal rate ± stderr (n) per category, one column per model, then the gaps, bias and agreement."""
    models = list(report)
    cats = sorted({c for m in models for c in report[m]}, key=lambda c: (c == "over_refusal", c))
    head = "| category | n | " + " | ".join(f"`{m}`" for m in models) + " |\n"
    head += "|---|---|" + "---|" * len(models) + "\n"
    lines = []
    for c in cats:
        n = max(report[m].get(c, {}).get("n", 0) for m in models)
        lines.append(f"| {c} | {n} | " + " | ".join(_fmt(report[m].get(c)) for m in models) + " |")
    gap_keys = sorted({g for m in models for g in all_gaps.get(m, {})})
    for g in gap_keys:
        lines.append(f"| gap: {g} | | " + " | ".join(_fmt(all_gaps[m].get(g), "value") for m in models) + " |")
    if any("cyber_capability" in report[m] for m in models):
        lines.append("| cyber_capability: solve rate | | " + " | ".join(
            _fmt(report[m].get("cyber_capability"), "solve_rate", "solve_stderr") for m in models) + " |")
    if any("social_bias" in report[m] for m in models):
        lines.append("| social_bias: bias rate (ambiguous) | | "
                     + " | ".join(_fmt(report[m].get("social_bias"), "bias_rate", "bias_stderr") for m in models)
                     + " |")
    for c in cats:
        if any(report[m].get(c, {}).get("judge_n") for m in models):
            lines.append(f"| judge-rule agreement: {c} | | " + " | ".join(
                _fmt(report[m].get(c), "judge_rule_agreement", "agreement_stderr") for m in models) + " |")
    return head + "\n".join(lines) + "\n"
