"""Text knowledge, reasoning and code: the pre-training stage's held-out synthetic tasks as an inspect task.

    inspect eval k25/text_heldout -T config=RUN_DIR --model k25/RUN_DIR

The samples are `k25.data.pipeline.make_eval_examples` of the run's data config, the generation is greedy with
the run's `eval_max_new_tokens`, and the score is `k25.data.synthetic.exact_match`: what
`TextLMStage.evaluate` computes, so `text_heldout/mean_exact` equals the run's `eval/mean_exact` (a base
checkpoint is prompted raw, bos + prompt, as it trained; the k25 model API picks that by itself).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from inspect_ai import Task, task
from inspect_ai.dataset import MemoryDataset, Sample
from inspect_ai.model import GenerateConfig
from inspect_ai.scorer import Metric, SampleScore, Score, Target, metric, scorer
from inspect_ai.solver import TaskState, generate

from k25.data.pipeline import make_eval_examples
from k25.data.synthetic import exact_match
from k25.data.tokenizer import load_tokenizer
from k25.eval.tasks.config import load_config


@metric
def per_task_exact() -> Metric:
    """`<task>_exact` per task and `mean_exact`, the mean over tasks (the stage's eval keys without `eval/`)."""

    def compute(scores: list[SampleScore]) -> dict[str, float]:
        by_task: dict[str, list[float]] = defaultdict(list)
        if not scores:  # inspect also asks before any sample is scored
            return {}
        for s in scores:
            by_task[s.sample_metadata["task"]].append(float(s.score.value))
        out = {f"{t}_exact": float(np.mean(v)) for t, v in by_task.items()}
        out["mean_exact"] = float(np.mean([out[f"{t}_exact"] for t in by_task]))
        return out

    return compute


@scorer(metrics=[per_task_exact()])
def exact_match_scorer():
    """1.0 when the completion's first line equals the answer (`k25.data.synthetic.exact_match`)."""

    async def score(state: TaskState, target: Target) -> Score:
        pred = state.output.completion if state.output else ""
        return Score(value=float(exact_match(pred, target.text)), answer=pred)

    return score


@task
def text_heldout(config: str = "experiments/tiny_lm.py", n: int | None = None) -> Task:
    """The held-out examples of every synthetic text task in `config`'s data sources (`n` per task, default
    the config's `eval_examples`)."""
    cfg = load_config(config)
    tok = load_tokenizer(cfg.data.tokenizer)
    sets = make_eval_examples(cfg.data, tok, int(n or cfg.eval_examples))
    if not sets:
        raise ValueError(f"config={config!r}: its data sources {cfg.data.sources!r} hold no synthetic text task.")
    samples = [Sample(id=f"{t}-{i}", input=e["prompt"], target=e["answer"], metadata={"task": t})
               for t, examples in sets.items() for i, e in enumerate(examples)]
    return Task(dataset=MemoryDataset(samples, name="text_heldout"), solver=generate(), scorer=exact_match_scorer(),
                config=GenerateConfig(temperature=0.0, max_tokens=int(cfg.eval_max_new_tokens)))
