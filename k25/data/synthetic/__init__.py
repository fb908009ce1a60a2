"""Seeded synthetic tasks with checkable answers; ``make_task`` builds one by name."""

from k25.data.synthetic.parl_width import ParlWidthTask
from k25.data.synthetic.retrieval import RetrievalTask
from k25.data.synthetic.safety import SafetyTask
from k25.data.synthetic.stepwise import StepwiseTask
from k25.data.synthetic.text import TASKS, CodeTask, Example, KnowledgeTask, ReasoningTask, TextTask, exact_match

TASKS[RetrievalTask.name] = RetrievalTask  # long-context passkey documents (not a Table 1 column)
TASKS[ParlWidthTask.name] = ParlWidthTask  # the PARL width policy's warm-up (k25.swarm.parl)
TASKS[SafetyTask.name] = SafetyTask  # refuse harmful requests, answer look-alikes (experiments/rl_safety.py)
TASKS[StepwiseTask.name] = StepwiseTask  # worked steps + redundant re-checks: Toggle's length study


def make_task(name: str, **kwargs: object) -> TextTask:
    """A task from ``TASKS`` by name; ``kwargs`` go to its constructor (``seed``, ``eval_fraction``, ...)."""
    if name not in TASKS:
        raise KeyError(f"unknown synthetic task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["TASKS", "CodeTask", "Example", "KnowledgeTask", "ParlWidthTask", "ReasoningTask", "RetrievalTask",
           "SafetyTask", "StepwiseTask", "TextTask", "exact_match", "make_task"]
