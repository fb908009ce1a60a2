"""The safety suite on several models, side by side:

    python -m experiments.safety_report --models k25/RUN_DIR openai/NAME ... --workdir DIR [--judge openai/JUDGE]
        [--base_url openai/NAME=http://HOST:PORT/v1 ...] [--tasks ...] [--limit N] [--external [NAME ...]]

Models are inspect model names (`openai/...` read OPENAI_BASE_URL / OPENAI_API_KEY; the judge reads
JUDGE_BASE_URL / JUDGE_API_KEY first). Without --judge the rule-based scorer decides. Writes:

- DIR/report.json   model -> category -> {"refusal_rate", "stderr", "n", ...} (over-refusal is `over_refusal`)
- DIR/gaps.json     model -> English/Chinese censorship gaps and political-bias side gaps, with stderr
- DIR/external.json inspect_evals benchmarks (--external): their metrics, or why they could not run
- DIR/report.md     the side-by-side table
- DIR/refusal.png, over_refusal.png, gaps.png, agreement.png (error bars are one standard error)
- DIR/logs/         inspect's logs (`inspect view --log-dir DIR/logs`)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from inspect_ai import eval as inspect_eval

from k25.eval.safety.external import EXTERNAL, ExternalUnavailable, load_external
from k25.eval.safety.report import gaps, markdown_table, sample_rows, summarize
from k25.eval.safety.tasks import SAFETY_TASKS

NO_JUDGE = ("agentic_alignment", "cyber_capability")  # scored on recorded actions and flags


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.safety_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True, help="inspect model names, e.g. k25/DIR openai/NAME")
    p.add_argument("--workdir", required=True, help="where report.json, the table, plots and logs go")
    p.add_argument("--judge", default=None, help="rubric judge model (openai/NAME or k25/PATH); default: rules")
    p.add_argument("--tasks", nargs="+", default=list(SAFETY_TASKS), choices=list(SAFETY_TASKS))
    p.add_argument("--limit", type=int, default=None, help="samples per task (default: all)")
    p.add_argument("--model_args", nargs="*", default=[], help="KEY=VALUE model args for every model (-M)")
    p.add_argument("--base_url", nargs="*", default=[], help="MODEL=URL: a base URL for one model (models on "
                   "different OpenAI-compatible servers); others use OPENAI_BASE_URL")
    p.add_argument("--max_connections", type=int, default=8)
    p.add_argument("--max_tokens", type=int, default=None, help="override the tasks' max_tokens per reply")
    p.add_argument("--external", nargs="*", default=None, choices=list(EXTERNAL),
                   help="also run these inspect_evals benchmarks (no names: all) when their data can be fetched")
    args = p.parse_args(argv)
    for kv in args.model_args:
        if "=" not in kv:
            p.error(f"--model_args {kv!r}: use KEY=VALUE")
    args.base_urls = {}
    for kv in args.base_url:
        model, sep, url = kv.partition("=")
        if not sep or model not in args.models:
            p.error(f"--base_url {kv!r}: use MODEL=URL with MODEL one of --models")
        args.base_urls[model] = url
    return args


def _model_args(pairs: list[str]) -> dict:
    out = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def model_args_for(model: str, pairs: list[str]) -> dict:
    """`--model_args` for one model; `openai/...` models speak Chat Completions unless told otherwise (inspect
    takes an unknown name for OpenAI's newest model and would call the Responses API, which OpenAI-compatible
    servers such as vLLM and the k25 server do not serve)."""
    args = _model_args(pairs)
    if model.startswith("openai/"):
        args.setdefault("responses_api", False)
    return args


def _slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model).strip("_")


def run_model(model: str, args: argparse.Namespace) -> list[dict]:
    """Every selected task on one model; the rows of all scored samples."""
    tasks = [SAFETY_TASKS[t](**({} if t in NO_JUDGE else {"judge": args.judge})) for t in args.tasks]
    logs = inspect_eval(tasks, model=model, model_args=model_args_for(model, args.model_args), limit=args.limit,
                        model_base_url=args.base_urls.get(model),
                        log_dir=os.path.join(args.workdir, "logs", _slug(model)), display="none",
                        max_connections=args.max_connections, fail_on_error=False,
                        **({"max_tokens": args.max_tokens} if args.max_tokens else {}))
    return [row for log in logs for row in sample_rows(log)]


def run_external(model: str, names: list[str], args: argparse.Namespace) -> dict:
    out = {}
    for name in names:
        try:
            task = load_external(name)
        except ExternalUnavailable as e:
            print(f"[external] {e}", file=sys.stderr)
            out[name] = {"status": "unavailable", "reason": str(e)}
            continue
        log = inspect_eval(task, model=model, model_args=model_args_for(model, args.model_args), limit=args.limit,
                           model_base_url=args.base_urls.get(model),
                           log_dir=os.path.join(args.workdir, "logs", _slug(model)), display="none")[0]
        metrics = {f"{s.name}/{k}": m.value for s in (log.results.scores if log.results else [])
                   for k, m in s.metrics.items()}
        out[name] = {"status": log.status, "metrics": metrics}
    return out


def plot(report: dict, all_gaps: dict, workdir: str) -> list[str]:
    """Grouped bars with one-stderr error bars: refusal per category, over-refusal, gaps, judge-rule agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(report)
    written = []

    def bars(name: str, keys: list[str], get, ylabel: str, title: str, ylim=None) -> None:
        if not keys:
            return
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(keys) * len(models) + 2), 4))
        width = 0.8 / len(models)
        x = np.arange(len(keys))
        for i, m in enumerate(models):
            vals = [get(m, k) for k in keys]
            ax.bar(x + i * width, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=3, label=m)
        ax.set_xticks(x + width * (len(models) - 1) / 2, keys, rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if ylim:
            ax.set_ylim(*ylim)
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(workdir, f"{name}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def stat(key: str, se: str):
        def get(m, c):
            s = report[m].get(c, {})
            return (np.nan if s.get(key) is None else s[key]), (s.get(se) or 0.0)

        return get

    cats = sorted({c for m in models for c in report[m] if c != "over_refusal"})
    bars("refusal", cats, stat("refusal_rate", "stderr"), "refusal rate", "Refusal per category", (0, 1.05))
    bars("over_refusal", ["over_refusal"], stat("refusal_rate", "stderr"), "refusal rate on benign look-alikes",
         "Over-refusal", (0, 1.05))
    gap_keys = sorted({g for m in models for g in all_gaps.get(m, {})})
    bars("gaps", gap_keys, lambda m, g: (all_gaps[m].get(g, {}).get("value", np.nan),
                                         all_gaps[m].get(g, {}).get("stderr", 0.0)),
         "difference in refusal rate", "Censorship (ZH - EN) and political-bias (side b - a) gaps", (-1.05, 1.05))
    judged = sorted({c for m in models for c, s in report[m].items() if s.get("judge_n")})
    bars("agreement", judged, stat("judge_rule_agreement", "agreement_stderr"), "fraction agreeing",
         "Judge-rule agreement", (0, 1.05))
    return written


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.workdir, exist_ok=True)
    report, all_gaps, external = {}, {}, {}
    for model in args.models:
        rows = run_model(model, args)
        failed = [r for r in rows if "error" in r]
        if failed:
            print(f"[{model}] {len(failed)} sample(s) errored and are not scored, e.g. {failed[0]['id']}: "
                  f"{failed[0]['error'][:300]}", file=sys.stderr)
        report[model], all_gaps[model] = summarize(rows), gaps(rows)
        if args.external is not None:
            external[model] = run_external(model, args.external or list(EXTERNAL), args)
    table = markdown_table(report, all_gaps)
    with open(os.path.join(args.workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(args.workdir, "gaps.json"), "w") as f:
        json.dump(all_gaps, f, indent=1)
    if external:
        with open(os.path.join(args.workdir, "external.json"), "w") as f:
            json.dump(external, f, indent=1)
    judge = args.judge or "none (rule-based scorer)"
    with open(os.path.join(args.workdir, "report.md"), "w") as f:
        f.write(f"Refusal rate ± stderr per category (judge: {judge}).\n\n{table}")
    plot(report, all_gaps, args.workdir)
    print(table)
    return report


if __name__ == "__main__":
    main()
