"""Long-context retrieval: the passkey / multi-key probes of the long-context stage as an inspect task.

    inspect eval k25/long_context_retrieval -T config=RUN_DIR --model k25/RUN_DIR -M max_len=1100

The probes are `RetrievalTask.probe` over the run's `retrieval_eval` grid (lengths x depths x per_cell, plus
the multi-key probes), exactly those `k25.train.retrieval_eval.RetrievalEval` scores. A probe counts as
retrieved when the greedy continuation is the key and then stops (eos), which is the stage's criterion
(every answer digit and the closing eos the argmax given the prefix), so the metrics carry the stage's keys:
`retrieval_at_<n>`, `retrieval_at_<n>/depth_<pct>` and `multikey_at_<n>`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import GenerateConfig
from inspect_ai.scorer import Metric, SampleScore, Score, Target, metric, scorer
from inspect_ai.solver import TaskState, generate

from k25.data.synthetic.retrieval import DIGITS, RetrievalTask
from k25.eval.tasks.config import load_config
from k25.train.retrieval_eval import default_retrieval_eval_config, depth_key


def probe_samples(cfg) -> list[Sample]:
    """The grid's probes in RetrievalEval's order: single-needle cells per depth, then multi-key."""
    task = RetrievalTask(seed=int(cfg.seed), min_len=RetrievalTask.min_length(1),
                         max_len=max(RetrievalTask.min_length(int(cfg.multi_keys)), min(cfg.lengths)))
    samples = []
    for n in cfg.lengths:
        for keys, label in ((1, None), (int(cfg.multi_keys), "multikey")):
            for depth in cfg.depths:
                for i in range(int(cfg.per_cell)):
                    r = task.probe(int(n), float(depth), keys, i)
                    cell = label or f"depth_{depth_key(depth)}"
                    samples.append(Sample(id=f"{n}-{cell}-{depth_key(depth)}-{i}", input=r["prompt"],
                                          target=r["answer"], metadata={"length": int(n), "cell": cell}))
    return samples


@metric
def retrieval_metrics() -> Metric:
    def compute(scores: list[SampleScore]) -> dict[str, float]:
        cells: dict[tuple[int, str], list[float]] = defaultdict(list)
        if not scores:  # inspect also asks before any sample is scored
            return {}
        for s in scores:
            cells[(s.sample_metadata["length"], s.sample_metadata["cell"])].append(float(s.score.value))
        out = {}
        for n in sorted({n for n, _ in cells}):
            single = [v for (m, c), vals in cells.items() if m == n and c != "multikey" for v in vals]
            if single:
                out[f"retrieval_at_{n}"] = float(np.mean(single))
            for (m, c), vals in cells.items():
                if m == n and c != "multikey":
                    out[f"retrieval_at_{n}/{c}"] = float(np.mean(vals))
            if cells.get((n, "multikey")):
                out[f"multikey_at_{n}"] = float(np.mean(cells[(n, "multikey")]))
        return out

    return compute


@scorer(metrics=[retrieval_metrics()])
def retrieval_scorer():
    """1.0 when the continuation is exactly the key and generation stopped by itself."""

    async def score(state: TaskState, target: Target) -> Score:
        out = state.output
        pred = out.completion if out else ""
        stopped = bool(out and out.stop_reason == "stop")
        return Score(value=float(pred.strip() == target.text and stopped), answer=pred)

    return score


@task
def long_context_retrieval(config: str | None = None) -> Task:
    """The run's `retrieval_eval` grid (`config`: a run directory or experiment config; default grid otherwise)."""
    cfg = default_retrieval_eval_config()
    if config:
        run = load_config(config)
        if not run.get("retrieval_eval"):
            raise ValueError(f"config={config!r} has no retrieval_eval grid; leave config unset for the default.")
        cfg = run.retrieval_eval
    return Task(dataset=MemoryDataset(probe_samples(cfg), name="long_context_retrieval"), solver=generate(),
                scorer=retrieval_scorer(), config=GenerateConfig(temperature=0.0, max_tokens=DIGITS + 1))
